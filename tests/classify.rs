//! The default classifier against the error responses providers really send: one case per
//! class × provider cell of the provider notes, the two traps, broken bodies, transport error
//! chains, and in-band stream errors.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower_llm_resilience::classify::{
    Classification, Classifier, DEFAULT_PEEK_LIMIT, DefaultClassifier, FailureClass, HintSource,
    SharedClassifier, classify_stream_error,
};

use FailureClass::*;

struct Case {
    name: &'static str,
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    class: FailureClass,
    error_type: Option<&'static str>,
    error_code: Option<&'static str>,
    /// (milliseconds, source)
    wait: Option<(u64, HintSource)>,
    request_id: Option<&'static str>,
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

fn classify(status: u16, h: &[(&str, &str)], body: &[u8]) -> Classification {
    DefaultClassifier::default().classify_response(
        StatusCode::from_u16(status).unwrap(),
        &headers(h),
        body,
    )
}

const NO_HEADERS: &[(&str, &str)] = &[];

#[rustfmt::skip]
const CASES: &[Case] = &[
    // ---------------------------------------------------------------- rate limited (transient)
    Case {
        name: "openai 429 rate_limit_exceeded with retry-after",
        status: 429,
        headers: &[("retry-after", "2"), ("x-request-id", "req_7f3a"), ("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "1s")],
        body: r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc on requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        class: RateLimited, error_type: Some("requests"), error_code: Some("rate_limit_exceeded"),
        wait: Some((2000, HintSource::RetryAfterSeconds)), request_id: Some("req_7f3a"),
    },
    Case {
        name: "openai 429 rate limit, no retry-after, exhausted token window",
        status: 429,
        headers: &[("x-ratelimit-remaining-tokens", "0"), ("x-ratelimit-reset-tokens", "6m0s"), ("x-ratelimit-remaining-requests", "499"), ("x-ratelimit-reset-requests", "120ms")],
        body: r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, Used 29000, Requested 2000.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
        class: RateLimited, error_type: Some("tokens"), error_code: Some("rate_limit_exceeded"),
        wait: Some((360_000, HintSource::RateLimitReset)), request_id: None,
    },
    Case {
        name: "openai 429 slow_down",
        status: 429,
        headers: NO_HEADERS,
        body: r#"{"error":{"message":"Please reduce your rate of requests.","type":"rate_limit_error","param":null,"code":"slow_down"}}"#,
        class: RateLimited, error_type: Some("rate_limit_error"), error_code: Some("slow_down"),
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic 429 rate_limit_error with retry-after",
        status: 429,
        headers: &[("retry-after", "14"), ("request-id", "req_011CSHoEeqs5C35K2UUqR7Fy"), ("anthropic-ratelimit-input-tokens-remaining", "0"), ("anthropic-ratelimit-input-tokens-reset", "2025-08-21T12:40:59Z")],
        body: r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate limit for your organization (d1b6) of 50,000 input tokens per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits."},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#,
        class: RateLimited, error_type: Some("rate_limit_error"), error_code: None,
        wait: Some((14_000, HintSource::RetryAfterSeconds)), request_id: Some("req_011CSHoEeqs5C35K2UUqR7Fy"),
    },
    Case {
        name: "anthropic 429 spend-limit detail WITH retry-after is a rate limit",
        status: 429,
        headers: &[("retry-after", "30")],
        body: r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have exceeded your rate limit.","details":{"error_code":"enforced_spend_limit_reached"}},"request_id":"req_01"}"#,
        class: RateLimited, error_type: Some("rate_limit_error"), error_code: Some("enforced_spend_limit_reached"),
        wait: Some((30_000, HintSource::RetryAfterSeconds)), request_id: Some("req_01"),
    },
    Case {
        name: "gemini 429 RESOURCE_EXHAUSTED per-minute quota with RetryInfo",
        status: 429,
        headers: NO_HEADERS,
        body: r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.0-flash"},"quotaValue":"15"}]},{"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"15s"}]}}"#,
        class: RateLimited, error_type: Some("RESOURCE_EXHAUSTED"), error_code: Some("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
        wait: Some((15_000, HintSource::GeminiRetryInfo)), request_id: None,
    },
    Case {
        name: "vertex-hosted claude 429 in a one-element array",
        status: 429,
        headers: NO_HEADERS,
        body: r#"[{"error":{"code":429,"message":"Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model with base model: anthropic-claude-3-5-sonnet. Please submit a quota increase request.","status":"RESOURCE_EXHAUSTED"}}]"#,
        class: RateLimited, error_type: Some("RESOURCE_EXHAUSTED"), error_code: Some("429"),
        wait: None, request_id: None,
    },
    Case {
        name: "mistral 429 rate_limited (flat body)",
        status: 429,
        headers: &[("x-request-id", "b6a1c0")],
        body: r#"{"object":"error","message":"Requests rate limit exceeded","type":"rate_limited","param":null,"code":"1300"}"#,
        class: RateLimited, error_type: Some("rate_limited"), error_code: Some("1300"),
        wait: None, request_id: Some("b6a1c0"),
    },
    Case {
        name: "bedrock 429 ThrottlingException",
        status: 429,
        headers: &[("x-amzn-ErrorType", "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"), ("x-amzn-RequestId", "5f7a2c1e-0c2e-4a8e-9d3e-1b2c3d4e5f60")],
        body: r#"{"message":"Too many requests, please wait before trying again."}"#,
        class: RateLimited, error_type: Some("ThrottlingException"), error_code: None,
        wait: None, request_id: Some("5f7a2c1e-0c2e-4a8e-9d3e-1b2c3d4e5f60"),
    },
    Case {
        name: "azure 429 code \"429\" with retry-after-ms",
        status: 429,
        headers: &[("retry-after-ms", "2000"), ("retry-after", "2"), ("apim-request-id", "8c1f")],
        body: r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-02-01 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 2 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."}}"#,
        class: RateLimited, error_type: None, error_code: Some("429"),
        wait: Some((2000, HintSource::RetryAfterMs)), request_id: Some("8c1f"),
    },
    Case {
        name: "azure 429 with x-ms-retry-after-ms only",
        status: 429,
        headers: &[("x-ms-retry-after-ms", "850.5")],
        body: r#"{"error":{"code":"429","message":"Rate limit is exceeded. Try again in 1 seconds."}}"#,
        class: RateLimited, error_type: None, error_code: Some("429"),
        wait: Some((851, HintSource::MsRetryAfterMs)), request_id: None,
    },
    Case {
        name: "groq 429 tokens rate_limit_exceeded",
        status: 429,
        headers: &[("retry-after", "13"), ("x-request-id", "req_01j")],
        body: r#"{"error":{"message":"Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Used 5870, Requested 1432. Please try again in 13.02s.","type":"tokens","code":"rate_limit_exceeded"}}"#,
        class: RateLimited, error_type: Some("tokens"), error_code: Some("rate_limit_exceeded"),
        wait: Some((13_000, HintSource::RetryAfterSeconds)), request_id: Some("req_01j"),
    },
    Case {
        name: "openrouter 429 numeric code",
        status: 429,
        headers: &[("x-generation-id", "gen-1741")],
        body: r#"{"error":{"code":429,"message":"Rate limit exceeded: limit_rpm/google/gemini-2.5-pro","metadata":{"headers":{"X-RateLimit-Limit":"20","X-RateLimit-Remaining":"0"}}}}"#,
        class: RateLimited, error_type: None, error_code: Some("429"),
        wait: None, request_id: Some("gen-1741"),
    },
    // ------------------------------------------------------------------- quota / billing (terminal)
    Case {
        name: "openai 429 insufficient_quota (trap 1)",
        status: 429,
        headers: &[("x-request-id", "req_q")],
        body: r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
        class: QuotaExhausted, error_type: Some("insufficient_quota"), error_code: Some("insufficient_quota"),
        wait: None, request_id: Some("req_q"),
    },
    Case {
        name: "openai 429 insufficient_quota with retry-after is still quota",
        status: 429,
        headers: &[("retry-after", "20")],
        body: r#"{"error":{"message":"You exceeded your current quota.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
        class: QuotaExhausted, error_type: Some("insufficient_quota"), error_code: Some("insufficient_quota"),
        wait: Some((20_000, HintSource::RetryAfterSeconds)), request_id: None,
    },
    Case {
        name: "openai 429 credit_balance_exhausted",
        status: 429, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Your credit balance is exhausted.","type":"invalid_request_error","param":null,"code":"credit_balance_exhausted"}}"#,
        class: QuotaExhausted, error_type: Some("invalid_request_error"), error_code: Some("credit_balance_exhausted"),
        wait: None, request_id: None,
    },
    Case {
        name: "openai 429 organization_spend_limit_exceeded",
        status: 429, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Your organization has reached its spend limit.","type":"invalid_request_error","param":null,"code":"organization_spend_limit_exceeded"}}"#,
        class: QuotaExhausted, error_type: Some("invalid_request_error"), error_code: Some("organization_spend_limit_exceeded"),
        wait: None, request_id: None,
    },
    Case {
        name: "openai 429 project_spend_limit_exceeded",
        status: 429, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Your project has reached its spend limit.","type":"invalid_request_error","param":null,"code":"project_spend_limit_exceeded"}}"#,
        class: QuotaExhausted, error_type: Some("invalid_request_error"), error_code: Some("project_spend_limit_exceeded"),
        wait: None, request_id: None,
    },
    Case {
        name: "openai 429 organization_usage_limit_exceeded",
        status: 429, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Your organization has reached its usage limit.","type":"invalid_request_error","param":null,"code":"organization_usage_limit_exceeded"}}"#,
        class: QuotaExhausted, error_type: Some("invalid_request_error"), error_code: Some("organization_usage_limit_exceeded"),
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic 429 spend cap: enforced_spend_limit_reached, no retry-after (trap 1)",
        status: 429,
        headers: &[("request-id", "req_011CV")],
        body: r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have exceeded your organization's monthly spend limit.","details":{"error_code":"enforced_spend_limit_reached"}},"request_id":"req_011CV"}"#,
        class: QuotaExhausted, error_type: Some("rate_limit_error"), error_code: Some("enforced_spend_limit_reached"),
        wait: None, request_id: Some("req_011CV"),
    },
    Case {
        name: "anthropic 400 self-set spend limit",
        status: 400, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"invalid_request_error","message":"You have reached your specified API usage limits. You will regain access on 2025-09-01 at 00:00 UTC."},"request_id":"req_011CW"}"#,
        class: QuotaExhausted, error_type: Some("invalid_request_error"), error_code: None,
        wait: None, request_id: Some("req_011CW"),
    },
    Case {
        name: "anthropic 400 credit balance too low",
        status: 400, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}"#,
        class: QuotaExhausted, error_type: Some("invalid_request_error"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic 402 billing_error",
        status: 402, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"billing_error","message":"There is an issue with your account's billing."},"request_id":"req_b"}"#,
        class: QuotaExhausted, error_type: Some("billing_error"), error_code: None,
        wait: None, request_id: Some("req_b"),
    },
    Case {
        name: "gemini 429 RESOURCE_EXHAUSTED with a PerDay quota id",
        status: 429, headers: NO_HEADERS,
        body: r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.5-pro"},"quotaValue":"50"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"43s"}]}}"#,
        class: QuotaExhausted, error_type: Some("RESOURCE_EXHAUSTED"), error_code: Some("GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
        wait: Some((43_000, HintSource::GeminiRetryInfo)), request_id: None,
    },
    Case {
        name: "gemini 402",
        status: 402, headers: NO_HEADERS,
        body: r#"{"error":{"code":402,"message":"Your prepayment credits are depleted.","status":"FAILED_PRECONDITION"}}"#,
        class: QuotaExhausted, error_type: Some("FAILED_PRECONDITION"), error_code: Some("402"),
        wait: None, request_id: None,
    },
    Case {
        name: "openrouter 402 no credits",
        status: 402, headers: NO_HEADERS,
        body: r#"{"error":{"code":402,"message":"Insufficient credits. This account never purchased credits. Make sure your key is on the correct account or org, and if so, purchase more at https://openrouter.ai/settings/credits"}}"#,
        class: QuotaExhausted, error_type: None, error_code: Some("402"),
        wait: None, request_id: None,
    },
    // ---------------------------------------------------------------- too large for any retry
    Case {
        name: "openai 429 Request too large (trap 2)",
        status: 429,
        headers: &[("retry-after", "1")],
        body: r#"{"error":{"message":"Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, Requested 45000. The input or output tokens must be reduced in order to run successfully. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#,
        class: InvalidRequest, error_type: Some("tokens"), error_code: Some("rate_limit_exceeded"),
        wait: Some((1000, HintSource::RetryAfterSeconds)), request_id: None,
    },
    Case {
        name: "groq 413 Request too large",
        status: 413, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Request too large for model `llama-3.1-8b-instant` in organization `org_01` service tier `on_demand` on tokens per minute (TPM): Limit 6000, Requested 7016, please reduce your message size and try again.","type":"tokens","code":"rate_limit_exceeded"}}"#,
        class: InvalidRequest, error_type: Some("tokens"), error_code: Some("rate_limit_exceeded"),
        wait: None, request_id: None,
    },
    // ------------------------------------------------------------------------------- overloaded
    Case {
        name: "anthropic 529 overloaded_error",
        status: 529,
        headers: &[("request-id", "req_o")],
        body: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_o"}"#,
        class: Overloaded, error_type: Some("overloaded_error"), error_code: None,
        wait: None, request_id: Some("req_o"),
    },
    Case {
        name: "anthropic api_error \"Overloaded\" on a 500",
        status: 500, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"api_error","message":"Overloaded"}}"#,
        class: Overloaded, error_type: Some("api_error"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic overloaded_error not on 529",
        status: 500, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        class: Overloaded, error_type: Some("overloaded_error"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "openai 503 server_is_overloaded",
        status: 503, headers: NO_HEADERS,
        body: r#"{"error":{"message":"The server is overloaded or not ready yet.","type":"server_error","param":null,"code":"server_is_overloaded"}}"#,
        class: Overloaded, error_type: Some("server_error"), error_code: Some("server_is_overloaded"),
        wait: None, request_id: None,
    },
    Case {
        name: "gemini 503 UNAVAILABLE",
        status: 503, headers: NO_HEADERS,
        body: r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#,
        class: Overloaded, error_type: Some("UNAVAILABLE"), error_code: Some("503"),
        wait: None, request_id: None,
    },
    Case {
        name: "groq 498 capacity_exceeded",
        status: 498, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Flex tier capacity exceeded. This is a temporary limit, please try again later.","type":"capacity_exceeded","code":"capacity_exceeded"}}"#,
        class: Overloaded, error_type: Some("capacity_exceeded"), error_code: Some("capacity_exceeded"),
        wait: None, request_id: None,
    },
    Case {
        name: "bedrock 503 ServiceUnavailableException",
        status: 503,
        headers: &[("x-amzn-ErrorType", "ServiceUnavailableException:http://internal.amazon.com/coral/com.amazon.bedrock/")],
        body: r#"{"message":"Bedrock is unable to process your request."}"#,
        class: Overloaded, error_type: Some("ServiceUnavailableException"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "mistral 429 service tier capacity exceeded",
        status: 429, headers: NO_HEADERS,
        body: r#"{"object":"error","message":"Service tier capacity exceeded for this model.","type":"service_tier_capacity_exceeded","param":null,"code":"3505"}"#,
        class: Overloaded, error_type: Some("service_tier_capacity_exceeded"), error_code: Some("3505"),
        wait: None, request_id: None,
    },
    // ---------------------------------------------------------------------------- server error
    Case {
        name: "openai 500 server_error",
        status: 500, headers: &[("x-request-id", "req_5")],
        body: r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#,
        class: ServerError, error_type: Some("server_error"), error_code: None,
        wait: None, request_id: Some("req_5"),
    },
    Case {
        name: "anthropic 500 api_error",
        status: 500, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"},"request_id":"req_i"}"#,
        class: ServerError, error_type: Some("api_error"), error_code: None,
        wait: None, request_id: Some("req_i"),
    },
    Case {
        name: "gemini 500 INTERNAL",
        status: 500, headers: NO_HEADERS,
        body: r#"{"error":{"code":500,"message":"An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting","status":"INTERNAL"}}"#,
        class: ServerError, error_type: Some("INTERNAL"), error_code: Some("500"),
        wait: None, request_id: None,
    },
    Case {
        name: "502 HTML from a gateway",
        status: 502, headers: NO_HEADERS,
        body: "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>",
        class: ServerError, error_type: None, error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "openrouter 502 numeric code",
        status: 502, headers: NO_HEADERS,
        body: r#"{"error":{"code":502,"message":"Provider returned error","metadata":{"provider_name":"Together","raw":"upstream connect error"}}}"#,
        class: ServerError, error_type: None, error_code: Some("502"),
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic 504 timeout_error",
        status: 504, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"timeout_error","message":"Request timed out"}}"#,
        class: ServerError, error_type: Some("timeout_error"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "gemini 504 DEADLINE_EXCEEDED",
        status: 504, headers: NO_HEADERS,
        body: r#"{"error":{"code":504,"message":"Deadline expired before operation could complete.","status":"DEADLINE_EXCEEDED"}}"#,
        class: ServerError, error_type: Some("DEADLINE_EXCEEDED"), error_code: Some("504"),
        wait: None, request_id: None,
    },
    // ------------------------------------------------------------------------- context overflow
    Case {
        name: "openai 400 context_length_exceeded",
        status: 400, headers: NO_HEADERS,
        body: r#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 130512 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
        class: ContextOverflow, error_type: Some("invalid_request_error"), error_code: Some("context_length_exceeded"),
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic 400 prompt is too long",
        status: 400, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"},"request_id":"req_c"}"#,
        class: ContextOverflow, error_type: Some("invalid_request_error"), error_code: None,
        wait: None, request_id: Some("req_c"),
    },
    Case {
        name: "gemini 400 INVALID_ARGUMENT over the token limit",
        status: 400, headers: NO_HEADERS,
        body: r#"{"error":{"code":400,"message":"The input token count (1231284) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#,
        class: ContextOverflow, error_type: Some("INVALID_ARGUMENT"), error_code: Some("400"),
        wait: None, request_id: None,
    },
    Case {
        name: "openai-compatible server 400 with only the wording",
        status: 400, headers: NO_HEADERS,
        body: r#"{"object":"error","message":"This model's maximum context length is 8192 tokens. However, you requested 9000 tokens (8000 in the messages, 1000 in the completion).","type":"BadRequestError","param":null,"code":400}"#,
        class: ContextOverflow, error_type: Some("BadRequestError"), error_code: Some("400"),
        wait: None, request_id: None,
    },
    // ----------------------------------------------------------------------------- policy block
    Case {
        name: "openai 400 content_policy_violation",
        status: 400, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Your request was rejected as a result of our safety system.","type":"invalid_request_error","param":null,"code":"content_policy_violation"}}"#,
        class: PolicyBlock, error_type: Some("invalid_request_error"), error_code: Some("content_policy_violation"),
        wait: None, request_id: None,
    },
    Case {
        name: "azure 400 content_filter with innererror",
        status: 400, headers: NO_HEADERS,
        body: r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content management policy.","type":null,"param":"prompt","code":"content_filter","status":400,"innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"hate":{"filtered":true,"severity":"high"},"self_harm":{"filtered":false,"severity":"safe"}}}}}"#,
        class: PolicyBlock, error_type: None, error_code: Some("content_filter"),
        wait: None, request_id: None,
    },
    Case {
        name: "openrouter 403 moderation",
        status: 403, headers: NO_HEADERS,
        body: r#"{"error":{"code":403,"message":"openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for \"harassment\". No credits were charged.","metadata":{"reasons":["harassment"],"flagged_input":"...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#,
        class: PolicyBlock, error_type: None, error_code: Some("403"),
        wait: None, request_id: None,
    },
    // ------------------------------------------------------------------------------------ auth
    Case {
        name: "openai 401 invalid_api_key",
        status: 401, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Incorrect API key provided: sk-abc. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#,
        class: Auth, error_type: Some("invalid_request_error"), error_code: Some("invalid_api_key"),
        wait: None, request_id: None,
    },
    Case {
        name: "openai 403 unsupported_country_region_territory",
        status: 403, headers: NO_HEADERS,
        body: r#"{"error":{"code":"unsupported_country_region_territory","message":"Country, region, or territory not supported","param":null,"type":"request_forbidden"}}"#,
        class: Auth, error_type: Some("request_forbidden"), error_code: Some("unsupported_country_region_territory"),
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic 401 authentication_error",
        status: 401, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"},"request_id":"req_a"}"#,
        class: Auth, error_type: Some("authentication_error"), error_code: None,
        wait: None, request_id: Some("req_a"),
    },
    Case {
        name: "anthropic 403 permission_error",
        status: 403, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"permission_error","message":"Your API key does not have permission to use the specified resource."}}"#,
        class: Auth, error_type: Some("permission_error"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "gemini 403 PERMISSION_DENIED",
        status: 403, headers: NO_HEADERS,
        body: r#"{"error":{"code":403,"message":"Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.","status":"PERMISSION_DENIED"}}"#,
        class: Auth, error_type: Some("PERMISSION_DENIED"), error_code: Some("403"),
        wait: None, request_id: None,
    },
    Case {
        name: "gemini 400 API_KEY_INVALID",
        status: 400, headers: NO_HEADERS,
        body: r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#,
        class: Auth, error_type: Some("INVALID_ARGUMENT"), error_code: Some("API_KEY_INVALID"),
        wait: None, request_id: None,
    },
    Case {
        name: "azure 401 code \"401\"",
        status: 401, headers: NO_HEADERS,
        body: r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}"#,
        class: Auth, error_type: None, error_code: Some("401"),
        wait: None, request_id: None,
    },
    Case {
        name: "bedrock 403 AccessDeniedException",
        status: 403,
        headers: &[("x-amzn-ErrorType", "AccessDeniedException:http://internal.amazon.com/coral/com.amazon.coral.service/")],
        body: r#"{"message":"You don't have access to the model with the specified model ID."}"#,
        class: Auth, error_type: Some("AccessDeniedException"), error_code: None,
        wait: None, request_id: None,
    },
    // --------------------------------------------------------------------------- caller defect
    Case {
        name: "openai 400 invalid_request_error",
        status: 400, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Invalid value for 'temperature': expected a number <= 2.","type":"invalid_request_error","param":"temperature","code":"invalid_value"}}"#,
        class: InvalidRequest, error_type: Some("invalid_request_error"), error_code: Some("invalid_value"),
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic 400 max_tokens above the model's output limit is not a context overflow",
        status: 400, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: 100000 > 64000, which is the maximum allowed number of output tokens for claude-sonnet-4-20250514"}}"#,
        class: InvalidRequest, error_type: Some("invalid_request_error"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "openai 404 model_not_found",
        status: 404, headers: NO_HEADERS,
        body: r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
        class: InvalidRequest, error_type: Some("invalid_request_error"), error_code: Some("model_not_found"),
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic 404 not_found_error",
        status: 404, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-9"}}"#,
        class: InvalidRequest, error_type: Some("not_found_error"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "anthropic 413 request_too_large",
        status: 413, headers: NO_HEADERS,
        body: r#"{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum allowed number of bytes."}}"#,
        class: InvalidRequest, error_type: Some("request_too_large"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "413 from a CDN, non-JSON",
        status: 413, headers: &[("content-type", "text/html")],
        body: "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n",
        class: InvalidRequest, error_type: None, error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "mistral 422 with an object message",
        status: 422, headers: NO_HEADERS,
        body: r#"{"object":"error","message":{"detail":[{"type":"missing","loc":["body","messages"],"msg":"Field required","input":{"model":"mistral-large-latest"}}]},"type":"invalid_request_error","param":null,"code":null}"#,
        class: InvalidRequest, error_type: Some("invalid_request_error"), error_code: None,
        wait: None, request_id: None,
    },
    Case {
        name: "bedrock 400 ValidationException",
        status: 400,
        headers: &[("x-amzn-ErrorType", "ValidationException:http://internal.amazon.com/coral/com.amazon.bedrock/")],
        body: r#"{"message":"Malformed input request: #: extraneous key [foo] is not permitted, please reformat your input and try again."}"#,
        class: InvalidRequest, error_type: Some("ValidationException"), error_code: None,
        wait: None, request_id: None,
    },
    // ----------------------------------------------------------------------- conflict, timeout
    Case {
        name: "409 conflict",
        status: 409, headers: NO_HEADERS,
        body: r#"{"error":{"message":"Another request with the same idempotency key is in progress.","type":"invalid_request_error","param":null,"code":"conflict"}}"#,
        class: Conflict, error_type: Some("invalid_request_error"), error_code: Some("conflict"),
        wait: None, request_id: None,
    },
    Case {
        name: "openrouter 408",
        status: 408, headers: NO_HEADERS,
        body: r#"{"error":{"code":408,"message":"Request timed out"}}"#,
        class: Timeout, error_type: None, error_code: Some("408"),
        wait: None, request_id: None,
    },
    Case {
        name: "bedrock 408 ModelTimeoutException",
        status: 408,
        headers: &[("x-amzn-ErrorType", "ModelTimeoutException:http://internal.amazon.com/coral/com.amazon.bedrock/")],
        body: r#"{"message":"Model has timed out in processing the request."}"#,
        class: Timeout, error_type: Some("ModelTimeoutException"), error_code: None,
        wait: None, request_id: None,
    },
];

#[test]
fn every_provider_cell_classifies_its_real_body() {
    let mut failures = Vec::new();
    for case in CASES {
        let c = classify(case.status, case.headers, case.body.as_bytes());
        let got = (
            c.class,
            c.error_type.as_deref(),
            c.error_code.as_deref(),
            c.wait_hint.map(|h| (h.wait.as_millis() as u64, h.source)),
            c.request_id.as_deref(),
            c.status.map(|s| s.as_u16()),
        );
        let want = (
            Some(case.class),
            case.error_type,
            case.error_code,
            case.wait,
            case.request_id,
            Some(case.status),
        );
        if got != want {
            failures.push(format!("{}:\n   got {got:?}\n  want {want:?}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_table_covers_every_response_class() {
    for class in FailureClass::ALL {
        if matches!(class, Connect | Transport | StreamInterrupted) {
            continue; // not something a response says
        }
        assert!(
            CASES.iter().any(|c| c.class == class),
            "no case for {class}"
        );
    }
}

#[test]
fn successes_read_only_the_request_id() {
    let body = br#"{"error":{"code":"insufficient_quota"}}"#;
    for status in [200, 201, 204, 301, 304] {
        let c = classify(
            status,
            &[("x-request-id", "req_ok"), ("retry-after", "5")],
            body,
        );
        assert!(c.is_success(), "{status}");
        assert_eq!(c.class, None);
        assert_eq!(c.request_id.as_deref(), Some("req_ok"));
        assert_eq!(c.wait_hint, None);
        assert_eq!(c.error_code, None);
    }
}

#[test]
fn status_rules_apply_without_a_body() {
    for (status, class) in [
        (400, InvalidRequest),
        (401, Auth),
        (402, QuotaExhausted),
        (403, Auth),
        (404, InvalidRequest),
        (408, Timeout),
        (409, Conflict),
        (413, InvalidRequest),
        (418, InvalidRequest),
        (422, InvalidRequest),
        (429, RateLimited),
        (498, Overloaded),
        (500, ServerError),
        (501, ServerError),
        (502, ServerError),
        (503, Overloaded),
        (504, ServerError),
        (529, Overloaded),
        (599, ServerError),
    ] {
        let c = classify(status, &[], b"");
        assert_eq!(c.class, Some(class), "{status}");
        assert_eq!((c.error_type, c.error_code), (None, None), "{status}");
    }
}

#[test]
fn should_retry_header_is_reported() {
    let c = classify(500, &[("x-should-retry", "false")], b"");
    assert_eq!(c.should_retry, Some(false));
    let c = classify(400, &[("x-should-retry", "TRUE")], b"");
    assert_eq!(c.should_retry, Some(true));
    let c = classify(400, &[("x-should-retry", "maybe")], b"");
    assert_eq!(c.should_retry, None);
}

#[test]
fn http_date_retry_after_is_judged_against_the_date_header() {
    let c = classify(
        503,
        &[
            ("date", "Wed, 21 Oct 2015 07:28:00 GMT"),
            ("retry-after", "Wed, 21 Oct 2015 07:28:30 GMT"),
        ],
        b"",
    );
    assert_eq!(c.class, Some(Overloaded));
    let hint = c.wait_hint.unwrap();
    assert_eq!(hint.wait, Duration::from_secs(30));
    assert_eq!(hint.source, HintSource::RetryAfterDate);
}

#[test]
fn headers_hint_wins_over_retry_info() {
    let body = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"15s"}]}}"#;
    let c = classify(429, &[("retry-after", "3")], body);
    assert_eq!(c.wait_hint.unwrap().wait, Duration::from_secs(3));
    assert_eq!(c.wait_hint.unwrap().source, HintSource::RetryAfterSeconds);
}

// ------------------------------------------------------------------------------ broken bodies

#[test]
fn broken_bodies_fall_back_to_the_status() {
    let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
    let cases: Vec<(&str, u16, Vec<u8>, FailureClass)> = vec![
        ("empty", 429, vec![], RateLimited),
        ("whitespace", 500, b"  \r\n ".to_vec(), ServerError),
        (
            "plain text",
            429,
            b"Too Many Requests".to_vec(),
            RateLimited,
        ),
        (
            "truncated quota JSON",
            429,
            quota.as_bytes()[..quota.len() / 2].to_vec(),
            RateLimited,
        ),
        (
            "nested-string body",
            429,
            serde_json::to_vec(&serde_json::Value::String(quota.to_owned())).unwrap(),
            RateLimited,
        ),
        (
            "unknown fields only",
            400,
            br#"{"detail":"Not Found","trace":{"id":7,"spans":[1,2,3]}}"#.to_vec(),
            InvalidRequest,
        ),
        ("JSON null", 503, b"null".to_vec(), Overloaded),
        ("JSON number", 401, b"42".to_vec(), Auth),
        ("empty array", 429, b"[]".to_vec(), RateLimited),
        (
            "array of non-objects",
            500,
            b"[1,\"x\"]".to_vec(),
            ServerError,
        ),
        (
            "error: null",
            502,
            br#"{"error":null}"#.to_vec(),
            ServerError,
        ),
        (
            "invalid UTF-8",
            500,
            vec![0xff, 0xfe, b'{', 0xc3, 0x28, b'}'],
            ServerError,
        ),
        (
            "invalid UTF-8 inside JSON",
            429,
            b"{\"error\":{\"code\":\"insufficient_quota\",\"message\":\"\xff\xfe\"}}".to_vec(),
            RateLimited,
        ),
        (
            "deeply nested",
            400,
            "[".repeat(100_000).into_bytes(),
            InvalidRequest,
        ),
        ("one MiB of garbage", 503, vec![b'x'; 1 << 20], Overloaded),
        (
            "context JSON padded past the parse bound",
            400,
            format!(
                "{}{}",
                r#"{"error":{"code":"context_length_exceeded"}}"#,
                " ".repeat(2 << 20)
            )
            .into_bytes(),
            InvalidRequest,
        ),
    ];
    for (name, status, body, class) in cases {
        let c = classify(status, &[], &body);
        assert_eq!(c.class, Some(class), "{name}");
        assert_eq!(c.error_code, None, "{name}");
    }
}

#[test]
fn known_fields_among_unknown_ones_still_decide() {
    let body = br#"{"error":{"code":"context_length_exceeded","new_field":[1,{"deep":true}],"message":null,"type":7},"extra":{"x":1},"request_id":12}"#;
    let c = classify(400, &[], body);
    assert_eq!(c.class, Some(ContextOverflow));
    assert_eq!(c.error_code.as_deref(), Some("context_length_exceeded"));
    assert_eq!(c.error_type, None);
    assert_eq!(c.request_id, None);
}

#[test]
fn a_large_message_is_parsed_but_never_kept() {
    let message = "Your credit balance is too low. ".repeat(16 * 1024); // ~512 KiB
    let body = serde_json::json!({
        "type": "error",
        "error": {"type": "invalid_request_error", "message": message},
    })
    .to_string();
    let c = classify(400, &[], body.as_bytes());
    assert_eq!(c.class, Some(QuotaExhausted));
    assert_eq!(c.error_type.as_deref(), Some("invalid_request_error"));
    let debug = format!("{c:?}");
    assert!(!debug.contains("credit balance"), "{debug}");
}

#[test]
fn provider_fields_are_bounded_and_clean() {
    let long = "x".repeat(10_000);
    let body = serde_json::json!({
        "error": {"type": format!("weird\u{0}\n{long}"), "code": long, "message": "m"},
    })
    .to_string();
    let c = classify(500, &[("x-request-id", &"r".repeat(300))], body.as_bytes());
    assert_eq!(c.class, Some(ServerError));
    let t = c.error_type.unwrap();
    assert!(t.starts_with("weirdxx"), "{t}");
    assert_eq!(t.chars().count(), 128);
    assert_eq!(c.error_code.unwrap().chars().count(), 128);
    assert_eq!(c.request_id.unwrap().len(), 128);
}

#[test]
fn request_id_header_order_and_body_fallback() {
    let c = classify(
        500,
        &[("request-id", "anthropic"), ("x-request-id", "openai")],
        b"",
    );
    assert_eq!(c.request_id.as_deref(), Some("openai"));
    let c = classify(
        529,
        &[],
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_body"}"#,
    );
    assert_eq!(c.request_id.as_deref(), Some("req_body"));
}

#[test]
fn bedrock_header_alone_decides_and_coral_form_is_read() {
    let c = classify(
        400,
        &[(
            "x-amzn-errortype",
            "com.amazon.coral.service#ThrottlingException",
        )],
        b"",
    );
    assert_eq!(c.class, Some(RateLimited));
    assert_eq!(c.error_type.as_deref(), Some("ThrottlingException"));
    let c = classify(
        400,
        &[],
        br#"{"__type":"com.amazon.bedrock#ServiceQuotaExceededException","message":"Your request exceeds the service quota for your account."}"#,
    );
    assert_eq!(c.class, Some(QuotaExhausted));
    assert_eq!(
        c.error_type.as_deref(),
        Some("ServiceQuotaExceededException")
    );
}

#[tokio::test]
async fn shared_classifier_stores_the_classification_and_keeps_the_body() {
    let body = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
    let resp = http::Response::builder()
        .status(429)
        .header("x-request-id", "req_s")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (resp, c) = SharedClassifier::default().classify_response(resp).await;
    assert_eq!(c.class, Some(QuotaExhausted));
    assert_eq!(resp.extensions().get::<Classification>(), Some(&c));
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes, body.as_bytes());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bodies_never_panic(status in 400u16..600, body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let c = classify(status, &[], &body);
        prop_assert!(c.class.is_some());
        prop_assert_eq!(c.status.map(|s| s.as_u16()), Some(status));
    }

    #[test]
    fn json_like_bodies_never_panic(
        status in 400u16..600,
        body in r#"\[?\{"(error|type|code|status|message|details)":(\{"(type|code|status|message|details|innererror|metadata)":("[a-zA-Z_ ]{0,20}"|[0-9]{1,4}|null|\[\{"@type":"type.googleapis.com/google.rpc.(RetryInfo|QuotaFailure|ErrorInfo)","(retryDelay|reason|violations)":("-?[0-9.]{0,6}s?"|\[\{"quotaId":"[A-Za-z]{0,12}"\}\])\}\])\}|"[a-z]{0,8}"|[0-9]{0,3})\}\]?"#,
    ) {
        let c = classify(status, &[], body.as_bytes());
        prop_assert!(c.class.is_some());
        if let Some(h) = c.wait_hint {
            prop_assert!(h.wait > Duration::ZERO && h.wait <= tower_llm_resilience::classify::hints::MAX_HINT);
        }
        let _ = classify_stream_error(body.as_bytes());
    }
}

// --------------------------------------------------------------------------- transport errors

fn error_class(e: &(dyn StdError + 'static)) -> Option<FailureClass> {
    DefaultClassifier::default().classify_error(e).class
}

#[tokio::test]
async fn refused_connection_through_hyper_util_is_connect() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{addr}/v1/models"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let err = client.request(req).await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(error_class(&err), Some(Connect));
    let e = SharedClassifier::default().error(err);
    assert_eq!(e.class(), Some(Connect));
    assert_eq!(e.classification().and_then(|c| c.class), Some(Connect));
}

#[tokio::test]
async fn server_closing_before_any_response_byte_is_connect() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::AsyncReadExt;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = sock.read(&mut buf).await;
        drop(sock);
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let err = client.request(req).await.unwrap_err();
    assert!(!err.is_connect(), "{err:?}");
    assert_eq!(error_class(&err), Some(Connect), "{err:?}");
}

#[tokio::test]
async fn a_garbled_response_is_transport() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = sock.read(&mut buf).await;
        let _ = sock.write_all(b"SMTP 220 hello\r\n\r\n").await;
        let _ = sock.flush().await;
        // keep the connection open until the client has judged the garbage
        let _ = done_rx.await;
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{addr}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let err = client.request(req).await.unwrap_err();
    let _ = done_tx.send(());
    assert_eq!(error_class(&err), Some(Transport), "{err:?}");
}

/// A server that sends a response head and part of a body, then resets (or closes) the
/// connection: the body error must not read as "never sent".
async fn cut_body_error(reset: bool) -> hyper::Error {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (head_read_tx, head_read_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = sock.read(&mut buf).await;
        let _ = sock
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
            .await;
        let _ = sock.flush().await;
        let _ = head_read_rx.await;
        if reset {
            #[allow(deprecated)]
            let _ = sock.set_linger(Some(Duration::ZERO));
        }
        drop(sock);
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{addr}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = head_read_tx.send(());
    resp.into_body().collect().await.unwrap_err()
}

#[tokio::test]
async fn a_body_cut_after_the_head_is_transport_not_connect() {
    for reset in [true, false] {
        let err = cut_body_error(reset).await;
        assert_eq!(error_class(&err), Some(Transport), "reset={reset}: {err:?}");
    }
}

#[test]
fn io_error_kinds() {
    use std::io::{Error, ErrorKind as K};
    for (kind, class) in [
        (K::ConnectionRefused, Connect),
        (K::ConnectionReset, Connect),
        (K::ConnectionAborted, Connect),
        (K::NotConnected, Connect),
        (K::BrokenPipe, Connect),
        (K::AddrNotAvailable, Connect),
        (K::HostUnreachable, Connect),
        (K::NetworkUnreachable, Connect),
        (K::TimedOut, Timeout),
        (K::UnexpectedEof, Transport),
        (K::InvalidData, Transport),
        (K::Other, Transport),
    ] {
        let e = Error::new(kind, "x");
        assert_eq!(error_class(&e), Some(class), "{kind:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn tokio_elapsed_is_timeout_also_inside_an_io_error() {
    let elapsed = tokio::time::timeout(Duration::from_millis(5), std::future::pending::<()>())
        .await
        .unwrap_err();
    assert_eq!(error_class(&elapsed), Some(Timeout));
    let wrapped = std::io::Error::other(elapsed);
    assert_eq!(error_class(&wrapped), Some(Timeout));
}

#[tokio::test(start_paused = true)]
async fn tower_timeout_is_timeout() {
    use tower::{Service, ServiceExt};
    let mut svc = tower::timeout::Timeout::new(
        tower::service_fn(|()| std::future::pending::<Result<(), std::convert::Infallible>>()),
        Duration::from_secs(1),
    );
    let err = svc
        .ready()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .call(())
        .await
        .unwrap_err();
    assert_eq!(error_class(&*err), Some(Timeout));
}

#[derive(Debug)]
struct Wrap(&'static str, Option<Box<dyn StdError + Send + Sync>>);

impl fmt::Display for Wrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl StdError for Wrap {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.1.as_deref().map(|e| e as &(dyn StdError + 'static))
    }
}

#[test]
fn the_chain_is_walked() {
    use std::io::{Error, ErrorKind as K};
    let e = Wrap(
        "request failed",
        Some(Box::new(Wrap(
            "send",
            Some(Box::new(Error::new(K::ConnectionReset, "reset"))),
        ))),
    );
    assert_eq!(error_class(&e), Some(Connect));

    let crate_err = tower_llm_resilience::Error::transport(Overloaded, "x");
    let e = Wrap("outer", Some(Box::new(crate_err)));
    assert_eq!(error_class(&e), Some(Overloaded));

    let deadline =
        tower_llm_resilience::Error::new(tower_llm_resilience::ErrorKind::DeadlineExceeded);
    assert_eq!(error_class(&deadline), Some(Timeout));

    // hyper-util's legacy connect error, known by its Display: a DNS failure has no telling io kind
    let dns = Wrap(
        "client error (Connect)",
        Some(Box::new(Wrap(
            "dns error",
            Some(Box::new(Error::other("failed to lookup address"))),
        ))),
    );
    assert_eq!(error_class(&dns), Some(Connect));
    // … and a connect timeout under it is still a connect failure: nothing was sent
    let connect_timeout = Wrap(
        "client error (Connect)",
        Some(Box::new(Error::new(K::TimedOut, "connect timeout"))),
    );
    assert_eq!(error_class(&connect_timeout), Some(Connect));
    let similar = Wrap("client error (Connect) and more", None);
    assert_eq!(error_class(&similar), Some(Transport));

    let long = Wrap(Box::leak("y".repeat(1 << 20).into_boxed_str()), None);
    assert_eq!(error_class(&long), Some(Transport));

    let mut deep: Box<dyn StdError + Send + Sync> = Box::new(Error::new(K::ConnectionRefused, "r"));
    for _ in 0..10 {
        deep = Box::new(Wrap("layer", Some(deep)));
    }
    assert_eq!(error_class(&*deep), Some(Connect));
    for _ in 0..100 {
        deep = Box::new(Wrap("layer", Some(deep)));
    }
    // past the depth bound the walk gives up instead of running on
    assert_eq!(error_class(&*deep), Some(Transport));
}

// ------------------------------------------------------------------------- in-band stream errors

/// (name, payload, class, error type, error code)
type StreamCase = (
    &'static str,
    &'static str,
    FailureClass,
    Option<&'static str>,
    Option<&'static str>,
);

#[test]
fn in_band_errors_classify_like_their_http_equivalents() {
    let cases: &[StreamCase] = &[
        (
            "openai chunk server_error",
            r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","type":"server_error","param":null,"code":null}}"#,
            ServerError,
            Some("server_error"),
            None,
        ),
        (
            "openai chunk rate limit",
            r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
            RateLimited,
            Some("requests"),
            Some("rate_limit_exceeded"),
        ),
        (
            "openrouter mid-stream string code",
            r#"{"id":"gen-1","object":"chat.completion.chunk","created":1741305600,"model":"openai/gpt-4o","provider":"OpenAI","error":{"code":"server_error","message":"Provider disconnected unexpectedly"},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]}"#,
            ServerError,
            None,
            Some("server_error"),
        ),
        (
            "openrouter numeric 429",
            r#"{"error":{"code":429,"message":"Rate limit exceeded"}}"#,
            RateLimited,
            None,
            Some("429"),
        ),
        (
            "openrouter numeric 403 moderation",
            r#"{"error":{"code":403,"message":"flagged","metadata":{"reasons":["violence"]}}}"#,
            PolicyBlock,
            None,
            Some("403"),
        ),
        (
            "anthropic overloaded_error",
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            Overloaded,
            Some("overloaded_error"),
            None,
        ),
        (
            "anthropic api_error Overloaded",
            r#"{"type":"error","error":{"type":"api_error","message":"Overloaded"}}"#,
            Overloaded,
            Some("api_error"),
            None,
        ),
        (
            "anthropic api_error",
            r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#,
            ServerError,
            Some("api_error"),
            None,
        ),
        (
            "anthropic rate_limit_error",
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"Rate limited"}}"#,
            RateLimited,
            Some("rate_limit_error"),
            None,
        ),
        (
            "anthropic spend limit (no headers, so no retry-after)",
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"spend","details":{"error_code":"enforced_spend_limit_reached"}}}"#,
            QuotaExhausted,
            Some("rate_limit_error"),
            Some("enforced_spend_limit_reached"),
        ),
        (
            "anthropic invalid_request_error prompt too long",
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#,
            ContextOverflow,
            Some("invalid_request_error"),
            None,
        ),
        (
            "anthropic invalid_request_error",
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: roles must alternate"}}"#,
            InvalidRequest,
            Some("invalid_request_error"),
            None,
        ),
        (
            "responses error event",
            r#"{"type":"error","code":"ERR_SOMETHING","message":"Something went wrong","param":null,"sequence_number":1}"#,
            ServerError,
            None,
            Some("ERR_SOMETHING"),
        ),
        (
            "responses error event, nested",
            r#"{"type":"error","error":{"type":"invalid_request_error","code":"context_length_exceeded","message":"Your input exceeds the context window of this model."},"sequence_number":3}"#,
            ContextOverflow,
            Some("invalid_request_error"),
            Some("context_length_exceeded"),
        ),
        (
            "responses response.failed server_error",
            r#"{"type":"response.failed","sequence_number":9,"response":{"id":"resp_1","object":"response","status":"failed","error":{"code":"server_error","message":"The model failed to generate a response."},"incomplete_details":null}}"#,
            ServerError,
            None,
            Some("server_error"),
        ),
        (
            "responses response.failed rate_limit_exceeded",
            r#"{"type":"response.failed","response":{"status":"failed","error":{"code":"rate_limit_exceeded","message":"Rate limit reached"}}}"#,
            RateLimited,
            None,
            Some("rate_limit_exceeded"),
        ),
        (
            "responses response.failed without an error object",
            r#"{"type":"response.failed","response":{"status":"failed","error":null}}"#,
            ServerError,
            None,
            None,
        ),
        (
            "responses response.incomplete content_filter",
            r#"{"type":"response.incomplete","response":{"status":"incomplete","incomplete_details":{"reason":"content_filter"}}}"#,
            PolicyBlock,
            None,
            Some("content_filter"),
        ),
        (
            "gemini error chunk",
            r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#,
            Overloaded,
            Some("UNAVAILABLE"),
            Some("503"),
        ),
        (
            "gemini error chunk in an array",
            r#"[{"error":{"code":500,"message":"An internal error has occurred.","status":"INTERNAL"}}]"#,
            ServerError,
            Some("INTERNAL"),
            Some("500"),
        ),
        (
            "gemini DEADLINE_EXCEEDED",
            r#"{"error":{"status":"DEADLINE_EXCEEDED","message":"Deadline expired"}}"#,
            ServerError,
            Some("DEADLINE_EXCEEDED"),
            None,
        ),
        (
            "unknown error object",
            r#"{"error":{"weird":true}}"#,
            ServerError,
            None,
            None,
        ),
        (
            "error as a string",
            r#"{"error":"upstream died"}"#,
            ServerError,
            None,
            None,
        ),
    ];
    for (name, data, class, error_type, error_code) in cases {
        let c = classify_stream_error(data.as_bytes())
            .unwrap_or_else(|| panic!("{name}: not an error"));
        assert_eq!(c.class, Some(*class), "{name}");
        assert_eq!(c.error_type.as_deref(), *error_type, "{name}");
        assert_eq!(c.error_code.as_deref(), *error_code, "{name}");
        assert_eq!(c.status, None, "{name}");
        // the trait's default and the shared handle say the same
        let shared = SharedClassifier::default().classify_stream_error(data.as_bytes());
        assert_eq!(shared.as_ref(), Some(&c), "{name}");
    }
}

#[test]
fn in_band_gemini_retry_info_becomes_the_wait_hint() {
    let data = br#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"2.5s"}]}}"#;
    let c = classify_stream_error(data).unwrap();
    assert_eq!(c.class, Some(RateLimited));
    let h = c.wait_hint.unwrap();
    assert_eq!(
        (h.wait, h.source),
        (Duration::from_millis(2500), HintSource::GeminiRetryInfo)
    );
}

#[test]
fn ordinary_events_are_not_errors() {
    for data in [
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
        r#"{"id":"chatcmpl-1","choices":[{"delta":{},"finish_reason":"stop"}],"error":null}"#,
        r#"{"type":"ping"}"#,
        r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{"input_tokens":10,"output_tokens":1}}}"#,
        r#"{"type":"message_stop"}"#,
        r#"{"type":"response.completed","response":{"status":"completed","error":null}}"#,
        r#"{"type":"response.incomplete","response":{"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"}}}"#,
        r#"{"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"},"finishReason":"STOP"}]}"#,
        r#"{"error":""}"#,
        "[DONE]",
        "",
        "{\"choices\":[{",
        "\u{feff}",
    ] {
        assert_eq!(classify_stream_error(data.as_bytes()), None, "{data}");
    }
}

// ------------------------------------------------------------- the error-body peek bound

/// A body of fixed chunks that counts how often it was polled and how many frames it gave,
/// optionally answering `Pending` (and waking itself) before every chunk.
struct CountingBody {
    chunks: std::collections::VecDeque<Bytes>,
    polls: Arc<AtomicUsize>,
    frames: Arc<AtomicUsize>,
    pending_first: bool,
    pending_now: bool,
}

impl CountingBody {
    fn new(chunks: impl IntoIterator<Item = Bytes>, pending_first: bool) -> Self {
        Self {
            chunks: chunks.into_iter().collect(),
            polls: Arc::default(),
            frames: Arc::default(),
            pending_first,
            pending_now: pending_first,
        }
    }
}

impl http_body::Body for CountingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if self.pending_now {
            self.pending_now = false;
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        self.pending_now = self.pending_first;
        match self.chunks.pop_front() {
            Some(chunk) => {
                self.frames.fetch_add(1, Ordering::SeqCst);
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
            }
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && !self.pending_now
    }
}

/// A classifier that records the length of the body prefix it was given, then defers to the
/// default one.
#[derive(Clone, Default)]
struct Recording(Arc<std::sync::Mutex<Vec<usize>>>);

impl Classifier for Recording {
    fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Classification {
        self.0.lock().unwrap().push(body.len());
        DefaultClassifier::default().classify_response(status, headers, body)
    }

    fn classify_error(&self, error: &(dyn StdError + 'static)) -> Classification {
        DefaultClassifier::default().classify_error(error)
    }
}

/// An OpenAI quota body of exactly `len` bytes whose deciding fields come after a padded
/// message: `{"error":{"message":"xxx…","type":"insufficient_quota","code":"insufficient_quota"}}`.
fn quota_body_after_message(len: usize) -> Vec<u8> {
    let head = r#"{"error":{"message":""#;
    let tail = r#"","type":"insufficient_quota","code":"insufficient_quota"}}"#;
    let pad = len - head.len() - tail.len();
    let body = format!("{head}{}{tail}", "x".repeat(pad));
    assert_eq!(body.len(), len);
    body.into_bytes()
}

fn response_429<B>(body: B) -> http::Response<B> {
    http::Response::builder()
        .status(429)
        .header("x-request-id", "req_big")
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn an_error_body_past_the_peek_bound_is_classified_by_status_and_kept_whole() {
    assert_eq!(DEFAULT_PEEK_LIMIT, 64 * 1024);
    assert_eq!(SharedClassifier::default().peek_limit(), DEFAULT_PEEK_LIMIT);
    // the deciding fields start beyond the bound: the JSON the classifier sees is cut
    let body = quota_body_after_message(DEFAULT_PEEK_LIMIT + 4096);
    let type_at = memchr_find(&body, b"insufficient_quota");
    assert!(type_at > DEFAULT_PEEK_LIMIT, "{type_at}");
    // the same bytes, whole, are a quota error: only the bound makes the difference
    assert_eq!(classify(429, &[], &body).class, Some(QuotaExhausted));

    let rec = Recording::default();
    let shared = SharedClassifier::new(rec.clone());
    let (resp, c) = shared
        .classify_response(response_429(Full::new(Bytes::from(body.clone()))))
        .await;
    assert_eq!(
        *rec.0.lock().unwrap(),
        [DEFAULT_PEEK_LIMIT],
        "saw exactly the bound"
    );
    assert_eq!(c.class, Some(RateLimited));
    assert_eq!(c.status, Some(StatusCode::TOO_MANY_REQUESTS));
    assert_eq!(c.error_type, None);
    assert_eq!(c.error_code, None);
    assert_eq!(c.request_id.as_deref(), Some("req_big"));
    assert_eq!(resp.extensions().get::<Classification>(), Some(&c));
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes.len(), body.len());
    assert_eq!(&bytes[..], &body[..], "handed back byte for byte");

    // a raised bound reads it all and finds the quota
    let (resp, c) = SharedClassifier::default()
        .with_peek_limit(1 << 20)
        .classify_response(response_429(Full::new(Bytes::from(body.clone()))))
        .await;
    assert_eq!(c.class, Some(QuotaExhausted));
    assert_eq!(c.error_code.as_deref(), Some("insufficient_quota"));
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), body);
}

#[tokio::test]
async fn the_peek_bound_is_exact_to_the_byte() {
    // exactly 64 KiB: all of it is seen, the quota is found
    let fits = quota_body_after_message(DEFAULT_PEEK_LIMIT);
    let (resp, c) = SharedClassifier::default()
        .classify_response(response_429(Full::new(Bytes::from(fits.clone()))))
        .await;
    assert_eq!(c.class, Some(QuotaExhausted));
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), fits);
    // one byte more: the closing brace falls past the bound, the JSON is cut
    let cut = quota_body_after_message(DEFAULT_PEEK_LIMIT + 1);
    let (resp, c) = SharedClassifier::default()
        .classify_response(response_429(Full::new(Bytes::from(cut.clone()))))
        .await;
    assert_eq!(c.class, Some(RateLimited));
    assert_eq!(c.error_code, None);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), cut);
}

#[tokio::test]
async fn a_complete_json_before_the_bound_still_decides_whatever_follows() {
    // the JSON ends early; whitespace padding runs far past the bound
    let json = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
    let body = format!("{json}{}", " ".repeat(3 * DEFAULT_PEEK_LIMIT)).into_bytes();
    let rec = Recording::default();
    let (resp, c) = SharedClassifier::new(rec.clone())
        .classify_response(response_429(Full::new(Bytes::from(body.clone()))))
        .await;
    assert_eq!(*rec.0.lock().unwrap(), [DEFAULT_PEEK_LIMIT]);
    assert_eq!(c.class, Some(QuotaExhausted));
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), body);
}

#[tokio::test]
async fn many_small_chunks_past_the_bound_are_read_only_up_to_it_and_kept_whole() {
    const CHUNK: usize = 1000;
    for pending in [false, true] {
        let body = quota_body_after_message(200 * CHUNK + 17);
        let chunks: Vec<Bytes> = body.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
        assert_eq!(chunks.len(), 201);
        let counting = CountingBody::new(chunks, pending);
        let (polls, frames) = (counting.polls.clone(), counting.frames.clone());
        let rec = Recording::default();
        let (resp, c) = SharedClassifier::new(rec.clone())
            .classify_response(response_429(counting))
            .await;
        assert_eq!(
            *rec.0.lock().unwrap(),
            [DEFAULT_PEEK_LIMIT],
            "pending: {pending}"
        );
        assert_eq!(c.class, Some(RateLimited), "pending: {pending}");
        assert_eq!(c.error_code, None);
        // it stopped at the first chunk that reached the bound: 66 × 1000 ≥ 65 536 > 65 × 1000
        let needed = DEFAULT_PEEK_LIMIT.div_ceil(CHUNK);
        assert_eq!(needed, 66);
        assert_eq!(frames.load(Ordering::SeqCst), needed, "pending: {pending}");
        let expected_polls = if pending { 2 * needed } else { needed };
        assert_eq!(
            polls.load(Ordering::SeqCst),
            expected_polls,
            "pending: {pending}"
        );
        // the rest is still there, in order
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(frames.load(Ordering::SeqCst), 201);
        assert_eq!(bytes.len(), body.len(), "pending: {pending}");
        assert_eq!(&bytes[..], &body[..], "pending: {pending}");
    }
}

#[tokio::test]
async fn a_success_body_is_never_read_by_the_classifier() {
    // a quota JSON inside a 200 must not even be looked at
    let json = r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota"}}"#;
    let mut body = json.as_bytes().to_vec();
    body.extend(std::iter::repeat_n(b' ', 2 * DEFAULT_PEEK_LIMIT));
    let chunks: Vec<Bytes> = body.chunks(4096).map(Bytes::copy_from_slice).collect();
    let n = chunks.len();
    let counting = CountingBody::new(chunks, true);
    let (polls, frames) = (counting.polls.clone(), counting.frames.clone());
    let rec = Recording::default();
    let resp = http::Response::builder()
        .status(200)
        .header("x-request-id", "req_ok")
        .body(counting)
        .unwrap();
    let (resp, c) = SharedClassifier::new(rec.clone())
        .classify_response(resp)
        .await;
    assert_eq!(
        polls.load(Ordering::SeqCst),
        0,
        "polled before being handed back"
    );
    assert_eq!(frames.load(Ordering::SeqCst), 0);
    assert_eq!(
        *rec.0.lock().unwrap(),
        [0],
        "the classifier got an empty body"
    );
    assert!(c.is_success());
    assert_eq!(c.status, Some(StatusCode::OK));
    assert_eq!(c.request_id.as_deref(), Some("req_ok"));
    assert_eq!(resp.extensions().get::<Classification>(), Some(&c));
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(frames.load(Ordering::SeqCst), n);
    assert_eq!(&bytes[..], &body[..]);
}

#[tokio::test(start_paused = true)]
async fn a_success_body_that_would_stall_is_handed_back_at_once() {
    // a body that never yields a frame: if the classifier polled it, this would hang
    let polls = Arc::new(AtomicUsize::new(0));
    let stalled = StallBody(polls.clone());
    let resp = http::Response::builder().status(200).body(stalled).unwrap();
    let (resp, c) = tokio::time::timeout(
        Duration::from_secs(1),
        SharedClassifier::default().classify_response(resp),
    )
    .await
    .expect("the classifier waited on a success body");
    assert!(c.is_success());
    assert_eq!(polls.load(Ordering::SeqCst), 0);
    // the body is the caller's: it is still the stalled one
    let mut body = resp.into_body();
    let next = tokio::time::timeout(Duration::from_secs(5), body.frame()).await;
    assert!(next.is_err(), "a stalled body yields nothing");
    // the caller's polls reach the stalled body itself (tokio's timeout polls it again when
    // the timer fires)
    assert!(polls.load(Ordering::SeqCst) >= 1);
}

/// A body that counts its polls and never yields a frame (nor wakes anyone).
struct StallBody(Arc<AtomicUsize>);

impl http_body::Body for StallBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::task::Poll::Pending
    }
}

/// The first position of `needle` in `haystack` (panics when absent).
fn memchr_find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

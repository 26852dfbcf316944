//! Reading a request's attempt log and the small helpers many tests share.
#![allow(dead_code)] // each test binary uses the part it needs

use std::time::Duration;

use http::Response;
use tower_llm_resilience::attempt_log::Decision;
use tower_llm_resilience::{AttemptLog, Error};

/// The log of an answer: on the response, or on the error.
pub fn log_of<B>(out: &Result<Response<B>, Error>) -> AttemptLog {
    match out {
        Ok(r) => r.extensions().get::<AttemptLog>().cloned(),
        Err(e) => e.attempt_log().cloned(),
    }
    .unwrap_or_else(|| panic!("no attempt log on the answer"))
}

/// The log a response carries.
pub fn response_log<B>(response: &Response<B>) -> AttemptLog {
    response
        .extensions()
        .get::<AttemptLog>()
        .cloned()
        .unwrap_or_else(|| panic!("the response carries no attempt log"))
}

/// The last decision taken after the last attempt.
pub fn last_decision(log: &AttemptLog) -> Option<Decision> {
    log.attempts().last()?.decisions.last().cloned()
}

/// `n` milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A loopback port with nothing listening on it.
pub async fn closed_port() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind loopback: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local addr: {e}"));
    drop(listener);
    addr
}

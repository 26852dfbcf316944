//! Metric updates through the `metrics` facade (feature `metrics`).

use metrics::{Label, SharedString, Unit, counter, gauge, histogram};

use super::finish::End;
use super::names as n;
use super::{AlertKind, Noted, Observer};
use crate::StreamCause;
use crate::attempt_log::{Decision, LocalEventKind, StreamEnd, View};
use crate::classify::FailureClass;
use crate::route::RouteName;

/// Describes every metric to the recorder installed now.
pub(super) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        n::OPERATION_DURATION,
        Unit::Seconds,
        "GenAI operation duration: one logical request through the resilience stack"
    );
    describe_histogram!(
        n::TIME_TO_FIRST_CHUNK,
        Unit::Seconds,
        "Time from the request to the first content event of a streamed answer"
    );
    describe_histogram!(
        n::TOKEN_USAGE,
        "Tokens used by the answer, as the provider reported them"
    );
    describe_counter!(n::REQUESTS, "Logical requests by outcome");
    describe_histogram!(n::ATTEMPTS, "Transport attempts per logical request");
    describe_counter!(n::RETRIES, "Same-route retries by failure class");
    describe_counter!(n::FALLBACKS, "Route switches by from-route and to-route");
    describe_counter!(
        n::HEDGES,
        "Hedges sent, by the route they went to (not route switches)"
    );
    describe_counter!(
        n::REJECTIONS,
        "Calls refused locally, without a transport call"
    );
    describe_gauge!(
        n::CIRCUIT_STATE,
        "Circuit state per route: 0 closed, 1 half-open, 2 open, 3 forced open, 4 forced closed"
    );
    describe_counter!(n::CIRCUIT_TRANSITIONS, "Circuit state transitions");
    describe_counter!(
        n::RETRY_BUDGET_EXHAUSTED,
        "Retries and hops the retry budget refused"
    );
    describe_counter!(n::SPEND, "Spend booked, in micro cost units");
    describe_counter!(
        n::STREAMS_INTERRUPTED,
        "Streams that failed after their commit point"
    );
    describe_counter!(
        n::STREAMS_CONTINUED,
        "Cut streams finished on another route by stream continuation"
    );
    describe_histogram!(
        n::QUEUE_WAIT,
        Unit::Seconds,
        "Time requests waited in the rate limit's queue"
    );
    describe_counter!(n::ALERTS, "Alerts handed to the alert sink");
    describe_counter!(
        n::ALERTS_SUPPRESSED,
        "Alerts not sent: one of the same key was sent within the window"
    );
}

fn s(v: &'static str) -> SharedString {
    SharedString::const_str(v)
}

/// Every metric a finished request updates.
pub(super) fn request(o: &Observer, v: &View<'_>, noted: &Noted, end: &End<'_>) {
    let label = |r: Option<&RouteName>| match r {
        Some(r) => o.route_label(r),
        None => s(n::OTHER),
    };
    let served = end.served.and_then(|r| o.facts(r));

    // The GenAI operation.
    // Room for every attribute (and the token type): one allocation per label set.
    let mut attrs = Vec::with_capacity(8);
    attrs.push(Label::new(n::OPERATION, s(noted.operation)));
    if let Some(m) = &noted.model {
        attrs.push(Label::new(n::REQUEST_MODEL, SharedString::from(m.clone())));
    }
    if let Some(m) = served.and_then(|f| f.model.clone()).or(noted.model.clone()) {
        attrs.push(Label::new(n::RESPONSE_MODEL, SharedString::from(m)));
    }
    if let Some(a) = served
        .and_then(|f| f.address.clone())
        .or(noted.address.clone())
    {
        attrs.push(Label::new(n::SERVER_ADDRESS, SharedString::from(a)));
    }
    attrs.push(Label::new(n::ROUTE, label(end.served)));
    if let Some(usage) = end.usage {
        for (kind, tokens) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
        ] {
            let mut with_type = Vec::with_capacity(attrs.len() + 1);
            with_type.extend(attrs.iter().cloned());
            with_type.push(Label::new(n::TOKEN_TYPE, s(kind)));
            histogram!(n::TOKEN_USAGE, with_type).record(tokens as f64);
        }
    }
    if let Some(e) = end.error_type {
        attrs.push(Label::new(n::ERROR_TYPE, s(e)));
    }
    let first_chunk = end.last.and_then(|a| {
        let st = a.stream.as_ref().filter(|st| st.events > 0)?;
        Some(a.offset + st.time_to_first_token?)
    });
    if let Some(t) = first_chunk {
        histogram!(n::TIME_TO_FIRST_CHUNK, attrs.clone()).record(t.as_secs_f64());
    }
    histogram!(n::OPERATION_DURATION, attrs).record(v.elapsed().as_secs_f64());

    // The ladder's work.
    let requested = label(end.requested);
    let mut outcome = vec![
        Label::new(n::ROUTE, requested.clone()),
        Label::new(n::OUTCOME, s(end.outcome)),
    ];
    if let Some(e) = end.error_type {
        outcome.push(Label::new(n::ERROR_TYPE, s(e)));
    }
    counter!(n::REQUESTS, outcome).increment(1);
    histogram!(n::ATTEMPTS, n::ROUTE => requested).record(v.attempt_count() as f64);

    // Routes the chain visited (an attempt, or a refusal by its open circuit), in the order it
    // tried them (the policy's, or the one its selection strategy chose): the chain only moves
    // forward in it, so consecutive visits are its switches. A hedge is no switch: it is
    // counted as a hedge, and its attempt is not a visit.
    let order = v.events().iter().find_map(|e| match &e.kind {
        LocalEventKind::RouteChosen { candidates, .. } => Some(candidates.as_slice()),
        _ => None,
    });
    let position = |r: &RouteName| match order {
        Some(order) => order.iter().position(|c| c == r),
        None => o.chain_index(r),
    };
    let hedges = hedge_attempts(v);
    let mut visited: u64 = 0;
    let mut unknown = false;
    let mut visit = |r: Option<&RouteName>| match r.and_then(position) {
        Some(i) if i < 64 => visited |= 1 << i,
        _ => unknown = true,
    };
    for (a, decisions) in v.attempts() {
        if !hedges.contains(&a.index) {
            visit(a.route.as_ref());
        }
        for d in decisions {
            match d {
                Decision::Retry { .. } => {
                    let class = a.class.map_or(n::OTHER, FailureClass::as_str);
                    counter!(n::RETRIES, n::ROUTE => label(a.route.as_ref()), n::CLASS => class)
                        .increment(1);
                }
                Decision::Continue { to, .. } => {
                    counter!(
                        n::STREAMS_CONTINUED,
                        n::FROM_ROUTE => label(a.route.as_ref()),
                        n::TO_ROUTE => label(Some(to))
                    )
                    .increment(1);
                }
                _ => {}
            }
        }
        if let Some(StreamEnd::Interrupted(cause)) = a.stream.as_ref().map(|st| &st.end) {
            counter!(
                n::STREAMS_INTERRUPTED,
                n::ROUTE => label(a.route.as_ref()),
                n::CAUSE => cause_name(cause)
            )
            .increment(1);
        }
    }
    for e in v.events() {
        let route = e.route.as_ref();
        let reason = match &e.kind {
            LocalEventKind::CircuitOpen { .. } => {
                visit(route);
                "circuit_open"
            }
            LocalEventKind::RateLimited { .. } => "rate_limit",
            LocalEventKind::BudgetDenied => "spend_cap",
            LocalEventKind::Throttled { .. } => "throttle",
            LocalEventKind::StoreUnavailable => "store_unavailable",
            LocalEventKind::RetryBudgetDenied => {
                counter!(n::RETRY_BUDGET_EXHAUSTED, n::ROUTE => label(route)).increment(1);
                continue;
            }
            LocalEventKind::Queued { waited } => {
                histogram!(n::QUEUE_WAIT, n::ROUTE => label(route)).record(waited.as_secs_f64());
                continue;
            }
            LocalEventKind::DeadlineExceeded
            | LocalEventKind::CacheHit
            | LocalEventKind::LastResort
            | LocalEventKind::RouteSkipped { .. }
            // Counted as the request's outcome (`error.type` = `deferred`).
            | LocalEventKind::Deferred { .. }
            | LocalEventKind::RouteChosen { .. } => continue,
            LocalEventKind::Hedged { .. } => {
                counter!(n::HEDGES, n::ROUTE => label(route)).increment(1);
                continue;
            }
        };
        counter!(n::REJECTIONS, n::ROUTE => label(route), n::REASON => reason).increment(1);
    }
    if unknown {
        // Routes the policy does not name: only the switches the log recorded as decisions.
        for (a, decisions) in v.attempts() {
            for d in decisions {
                if let Decision::Fallback { to } = d {
                    fallback(label(a.route.as_ref()), label(Some(to)));
                }
            }
        }
    } else {
        // A position of the request's order, as the policy's route (its label).
        let route_at = |i: usize| match order {
            Some(order) => order.get(i).and_then(|r| o.chain_index(r)),
            None => Some(i),
        };
        let mut from: Option<usize> = None;
        for i in (0..64).filter(|i| visited & (1 << i) != 0) {
            let Some(i) = route_at(i) else { continue };
            if let Some(f) = from {
                fallback(
                    SharedString::from(o.routes[f].label.clone()),
                    SharedString::from(o.routes[i].label.clone()),
                );
            }
            from = Some(i);
        }
    }

    if let Some(cost) = v.cost_micros() {
        match v.budget_owner().filter(|_| o.owner_label) {
            Some(owner) => counter!(n::SPEND, n::OWNER => owner.to_owned()).increment(cost),
            None => counter!(n::SPEND).increment(cost),
        }
    }
}

/// The log indices of the hedges' attempts: for each `Hedged` event, the first attempt on its
/// route that started at or after it (the attempt it hedged started before).
fn hedge_attempts(v: &View<'_>) -> Vec<u32> {
    v.events()
        .iter()
        .filter(|e| matches!(e.kind, LocalEventKind::Hedged { .. }))
        .filter_map(|e| {
            v.attempts()
                .map(|(a, _)| a)
                .filter(|a| a.route == e.route && a.offset >= e.offset)
                .min_by_key(|a| a.offset)
                .map(|a| a.index)
        })
        .collect()
}

fn fallback(from: SharedString, to: SharedString) {
    counter!(n::FALLBACKS, n::FROM_ROUTE => from, n::TO_ROUTE => to).increment(1);
}

fn cause_name(cause: &StreamCause) -> &'static str {
    match cause {
        StreamCause::FirstTokenTimeout(_) => "first_token_timeout",
        StreamCause::IdleTimeout(_) => "idle_timeout",
        StreamCause::TotalTimeout(_) => "total_timeout",
        StreamCause::Disconnected => "disconnected",
        StreamCause::InBandError { .. } => "in_band_error",
        StreamCause::Truncated => "truncated",
        StreamCause::BufferExceeded(_) => "buffer_exceeded",
    }
}

/// The gauge's value for a state (`CircuitState::as_str`).
fn state_code(state: &str) -> f64 {
    match state {
        "closed" => 0.0,
        "half_open" => 1.0,
        "open" => 2.0,
        "forced_open" => 3.0,
        "forced_closed" => 4.0,
        _ => -1.0,
    }
}

pub(super) fn circuit_state(route: SharedString, state: &'static str) {
    gauge!(n::CIRCUIT_STATE, n::ROUTE => route).set(state_code(state));
}

pub(super) fn transition(route: SharedString, from: &'static str, to: &'static str) {
    circuit_state(route.clone(), to);
    counter!(
        n::CIRCUIT_TRANSITIONS,
        n::ROUTE => route,
        n::FROM_STATE => from,
        n::TO_STATE => to
    )
    .increment(1);
}

pub(super) fn alert(kind: AlertKind, sent: bool) {
    let name = if sent {
        n::ALERTS
    } else {
        n::ALERTS_SUPPRESSED
    };
    counter!(name, n::KIND => kind.as_str()).increment(1);
}

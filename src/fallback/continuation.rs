//! Continuing a stream cut after its commit point on a prefill-capable backup route: the
//! sender that outlives the layer's future, the choice of route, and the continuation request.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::Value;
use tower_service::Service;

use super::future::Needs;
use super::layer::Config;
use super::route::{Route, top_level_value};
use crate::attempt_log::{Decision, LocalEventKind, StopReason};
use crate::context::RequestContext;
use crate::policy::{ContinuationPolicy, PrefillForm, RequestNeeds};
use crate::replay::ReplayBody;
use crate::{Body, BoxError, RouteName, StreamCause};

/// What a continuation request resolves to: the continuation's response (its body guarded by
/// the layers below the fallback layer), or why there is none.
pub(crate) type ContinuationFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// Sends a continuation request through the service below the fallback layer. Type-erased so
/// that the response body (a `'static` [`Body`]) can hold it after every layer's future has
/// returned.
pub(crate) trait SendContinuation: Send + Sync {
    fn send(&self, req: Request<Bytes>) -> ContinuationFuture;
}

/// The sender [`Fallback::enable_continuation`](super::Fallback::enable_continuation) installs:
/// a clone of the service below the fallback layer, behind a type-erased handle.
#[derive(Clone)]
pub struct ContinuationSender(pub(crate) Arc<dyn SendContinuation>);

impl fmt::Debug for ContinuationSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContinuationSender").finish_non_exhaustive()
    }
}

/// A service the fallback layer can send a stream's continuation through from the response
/// body, after its own future has returned: `Clone + Send + 'static`, taking
/// `http::Request<B>` (rebuilt from bytes, see [`ReplayBody::from_bytes`]), with `Send`
/// futures and bodies. Implemented for every such service; see
/// [`Fallback::enable_continuation`](super::Fallback::enable_continuation).
pub trait ContinuationService<B>: Clone + Send + 'static {
    /// The type-erased sender holding a clone of `self`.
    fn continuation_sender(&self) -> ContinuationSender;
}

impl<S, B, RB> ContinuationService<B> for S
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    B: ReplayBody + Send + 'static,
{
    fn continuation_sender(&self) -> ContinuationSender {
        ContinuationSender(Arc::new(ServiceSender::<S, B> {
            svc: Mutex::new(self.clone()),
            body: PhantomData,
        }))
    }
}

struct ServiceSender<S, B> {
    // A mutex only to be `Sync` without asking it of the service; held for a clone.
    svc: Mutex<S>,
    body: PhantomData<fn() -> B>,
}

impl<S, B, RB> SendContinuation for ServiceSender<S, B>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    B: ReplayBody + Send + 'static,
{
    fn send(&self, req: Request<Bytes>) -> ContinuationFuture {
        let mut svc = self.svc.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move {
            let (parts, bytes) = req.into_parts();
            let body = B::from_bytes(bytes).ok_or("the request body type cannot be rebuilt")?;
            std::future::poll_fn(|cx| svc.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let response = svc
                .call(Request::from_parts(parts, body))
                .await
                .map_err(Into::into)?;
            Ok(response.map(Body::new))
        })
    }
}

/// What the continuation settings of a chain are, when `stream.continuation` is on.
#[derive(Debug, Clone)]
pub(crate) struct ContinuationConfig {
    pub(crate) policy: ContinuationPolicy,
    /// The most text of an answer kept for its prefill (`stream.max_buffer`).
    pub(crate) max_text: usize,
}

/// Everything a served stream's body needs to continue it: handed over by the chain when it
/// serves a stream, used only if the stream is cut.
pub(crate) struct Plan {
    config: Arc<Config>,
    sender: Arc<dyn SendContinuation>,
    /// The request as the caller sent it.
    template: Request<Bytes>,
    pub(crate) ctx: RequestContext,
    pub(crate) status: StatusCode,
    /// The route of the stream being continued: 0 the primary, `i > 0` `config.routes[i - 1]`.
    current: usize,
    /// The request's route order (the selection strategy's), in the same indices; empty: the
    /// written order.
    order: Vec<usize>,
    /// The attempt whose stream is being continued, if it was recorded.
    attempt: Option<usize>,
    need: Needs,
    /// What the request needs of a route, when some route declares what it lacks.
    request_needs: Option<RequestNeeds>,
    used: u32,
}

impl Plan {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Arc<Config>,
        sender: Arc<dyn SendContinuation>,
        template: Request<Bytes>,
        ctx: RequestContext,
        status: StatusCode,
        current: usize,
        attempt: Option<usize>,
        need: Needs,
    ) -> Self {
        Self {
            config,
            sender,
            template,
            ctx,
            status,
            current,
            order: Vec::new(),
            attempt,
            need,
            request_needs: None,
            used: 0,
        }
    }

    /// The plan for a request with `needs`: a continuation goes only to a route that can
    /// serve it (a continuation is a stream).
    pub(crate) fn needing(mut self, needs: Option<RequestNeeds>) -> Self {
        self.request_needs = needs.map(RequestNeeds::streaming);
        self
    }

    /// The plan for a request whose selection strategy ordered its routes (`order`, 0 the
    /// primary): a continuation goes to the routes after the current one in that order.
    pub(crate) fn in_order(mut self, order: Vec<usize>) -> Self {
        self.order = order;
        self
    }

    /// The routes a continuation may go to, in the request's order after the current route:
    /// backups only, as the primary is never sent a continuation.
    fn after_current(&self) -> Vec<usize> {
        let n = self.config.routes.len();
        match self.order.iter().position(|&r| r == self.current) {
            Some(p) => self.order[p + 1..]
                .iter()
                .copied()
                .filter(|&r| r > 0 && r <= n)
                .collect(),
            None => (self.current + 1..=n).collect(),
        }
    }

    pub(crate) fn settings(&self) -> Option<&ContinuationConfig> {
        self.config.continuation.as_ref()
    }

    /// Whether the policy lets `cause` be continued.
    pub(crate) fn allows(&self, cause: &StreamCause) -> bool {
        self.settings().is_some_and(|c| c.policy.allows(cause))
    }

    /// The continuation's response arrived: a later continuation continues its attempt.
    pub(crate) fn continued(&mut self) {
        self.attempt = self.ctx.log().attempt_count().checked_sub(1);
    }

    /// Starts a continuation of the stream cut by `cause` whose caller has `text` and
    /// `delivered_bytes`: on the next route after the current one (in the request's order)
    /// that the class's rule, the chain's needs and the pacing allow, that accepts a prefill
    /// and that the request can be written for. The future claims the spend and the retry
    /// budget first. `None` when there is no such route, or the continuation limit, the
    /// attempt cap or the deadline says no. Returns the route and the whitespace the prefill
    /// left out.
    pub(crate) fn start(
        &mut self,
        cause: &StreamCause,
        text: &str,
        delivered_bytes: u64,
    ) -> Option<(RouteName, String, ContinuationFuture)> {
        let settings = self.config.continuation.as_ref()?;
        if self.used >= settings.policy.max_continuations {
            return None;
        }
        let rule = self.config.actions.get(cause.class()).fallback;
        let mut need = self.need.clone();
        need.add(rule, self.config.owner_of(self.current)).ok()?;
        let log = self.ctx.log();
        if self
            .ctx
            .attempt_cap()
            .is_some_and(|cap| !cap.allows(log.attempt_count()))
        {
            return None;
        }
        if self.ctx.deadline().is_some_and(|d| d.remaining().is_zero()) {
            log.event(None, LocalEventKind::DeadlineExceeded);
            return None;
        }
        let pacer = self.ctx.pacer();
        let approved = &self.config.policy.approved_budget_owners;
        for i in self.after_current() {
            let route = &self.config.routes[i - 1];
            let Some(form) = route.prefill else {
                continue;
            };
            // An in-process route is not reached through the continuation's sender.
            if route.in_process || !need.allow(route, approved) {
                continue;
            }
            let lacks = self
                .request_needs
                .as_ref()
                .and_then(|n| route.capabilities.lacks(n));
            if let Some(reason) = lacks {
                let reason = reason.to_owned();
                log.event(
                    Some(route.name.clone()),
                    LocalEventKind::RouteSkipped { reason },
                );
                continue;
            }
            if let Some(retry_in) = pacer.as_ref().and_then(|p| p.remaining(&route.name)) {
                log.event(
                    Some(route.name.clone()),
                    LocalEventKind::RateLimited { retry_in },
                );
                continue;
            }
            let (request, skip) =
                match continuation_request(&self.template, route, form, text, &settings.policy) {
                    Ok(built) => built,
                    Err(reason) => {
                        log.event(
                            Some(route.name.clone()),
                            LocalEventKind::RouteSkipped {
                                reason: reason.to_owned(),
                            },
                        );
                        continue;
                    }
                };
            self.used += 1;
            self.current = i;
            self.need = need;
            let future = claim_and_send(
                self.ctx.clone(),
                self.sender.clone(),
                self.attempt,
                route.name.clone(),
                delivered_bytes,
                request,
            );
            return Some((route.name.clone(), skip, future));
        }
        None
    }
}

/// Claims the spend and the retry budget for a continuation on `to`, records the decision on
/// the attempt it continues, and sends it.
fn claim_and_send(
    ctx: RequestContext,
    sender: Arc<dyn SendContinuation>,
    attempt: Option<usize>,
    to: RouteName,
    delivered_bytes: u64,
    request: Request<Bytes>,
) -> ContinuationFuture {
    Box::pin(async move {
        let log = ctx.log().clone();
        let stop = |reason: StopReason| {
            if let Some(i) = attempt {
                log.decide(i, Decision::Stop(reason));
            }
        };
        // In the chain's order: the spend cap after every other check, the retry budget last.
        let gate = ctx.spend_gate();
        if let Some(gate) = &gate {
            if let Err(denied) = gate.admit(&to).await {
                log.event(Some(to.clone()), LocalEventKind::BudgetDenied);
                stop(StopReason::SpendCapReached);
                return Err(denied.into());
            }
        }
        if ctx.retry_budget().is_some_and(|b| !b.withdraw()) {
            if let Some(gate) = &gate {
                gate.release(&to);
            }
            log.event(Some(to.clone()), LocalEventKind::RetryBudgetDenied);
            stop(StopReason::RetryBudgetDenied);
            return Err("the retry budget denied the continuation".into());
        }
        if let Some(i) = attempt {
            log.decide(
                i,
                Decision::Continue {
                    to: to.clone(),
                    delivered_bytes,
                },
            );
        }
        ctx.write(|s| {
            s.route = Some(to.clone());
            // No fallback layer acts on the continuation's failure: the retries below must
            // not wait for one.
            s.fallback_available = false;
        });
        let mark = log.attempt_count();
        ctx.resend();
        let out = sender.send(request).await;
        // A continuation that made no call (an open circuit) gives its reservation back.
        if out.is_err() && log.attempt_count() == mark {
            if let Some(gate) = &gate {
                gate.release(&to);
            }
        }
        out
    })
}

/// The continuation request for `route`: the caller's request with the partial answer as the
/// last message in the route's prefill `form`, then the route's rewrite (URL, model, headers).
/// Returns it with the whitespace the prefill left out.
fn continuation_request(
    template: &Request<Bytes>,
    route: &Route,
    form: PrefillForm,
    text: &str,
    policy: &ContinuationPolicy,
) -> Result<(Request<Bytes>, String), &'static str> {
    let (body, skip) = prefill_body(template.body(), text, form, &policy.instruction)?;
    let len = body.len();
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = template.method().clone();
    *req.uri_mut() = template.uri().clone();
    *req.version_mut() = template.version();
    *req.headers_mut() = template.headers().clone();
    *req.extensions_mut() = template.extensions().clone();
    if req.headers().contains_key(CONTENT_LENGTH) {
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    route.rewrite(&mut req).map_err(|r| r.as_str())?;
    let (parts, body) = req.into_parts();
    let body = body.to_bytes().ok_or("request body cannot be rewritten")?;
    Ok((Request::from_parts(parts, body), skip))
}

/// `body` (a chat request: OpenAI-compatible or Anthropic Messages) with the partial answer
/// `text` added after its last message, every other byte unchanged:
///
/// - `anthropic`: `{"role":"assistant","content":TEXT}`, `TEXT` without its trailing
///   whitespace (the API rejects a final assistant message that ends with it);
/// - `openai`: `{"role":"system","content":INSTRUCTION},{"role":"assistant","content":TEXT}`;
/// - `mistral`: `{"role":"assistant","content":TEXT,"prefix":true}`.
///
/// Returns it with the whitespace left out of the prefill.
pub(crate) fn prefill_body(
    body: &[u8],
    text: &str,
    form: PrefillForm,
    instruction: &str,
) -> Result<(Bytes, String), &'static str> {
    let v: Value = serde_json::from_slice(body).map_err(|_| "request body is not JSON")?;
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("request body has no `messages` array")?;
    let last_role = messages
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str);
    if last_role == Some("assistant") {
        return Err("request already ends with an assistant message");
    }
    if v.get("n").and_then(Value::as_u64).is_some_and(|n| n != 1) {
        return Err("request asks for several choices");
    }
    let range = top_level_value(body, "messages")
        .map_err(|r| r.as_str())?
        .ok_or("request body has no `messages` array")?;
    let (prefill, skip) = match form {
        PrefillForm::Anthropic => {
            let kept = text.trim_end();
            (kept, &text[kept.len()..])
        }
        _ => (text, ""),
    };
    if prefill.is_empty() {
        return Err("no text to continue");
    }
    let quoted = |s: &str| serde_json::to_string(s).map_err(|_| "text cannot be written as JSON");
    let assistant = quoted(prefill)?;
    let added = match form {
        PrefillForm::Anthropic => format!(r#"{{"role":"assistant","content":{assistant}}}"#),
        PrefillForm::Mistral => {
            format!(r#"{{"role":"assistant","content":{assistant},"prefix":true}}"#)
        }
        _ => format!(
            r#"{{"role":"system","content":{}}},{{"role":"assistant","content":{assistant}}}"#,
            quoted(instruction)?
        ),
    };
    // After the last element (or the opening bracket), before any whitespace and the `]`.
    let inner = &body[range.start + 1..range.end - 1];
    let kept = inner.trim_ascii_end();
    let at = range.start + 1 + kept.len();
    let comma = !kept.trim_ascii_start().is_empty();
    let mut out = BytesMut::with_capacity(body.len() + added.len() + 1);
    out.extend_from_slice(&body[..at]);
    if comma {
        out.extend_from_slice(b",");
    }
    out.extend_from_slice(added.as_bytes());
    out.extend_from_slice(&body[at..]);
    Ok((out.freeze(), skip.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(b: &str, text: &str, form: PrefillForm) -> Result<(String, String), &'static str> {
        prefill_body(b.as_bytes(), text, form, "GO ON")
            .map(|(b, s)| (String::from_utf8_lossy(&b).into_owned(), s))
    }

    #[test]
    fn each_form_appends_after_the_last_message_and_keeps_every_other_byte() {
        let b = r#"{"model":"m", "messages" : [ {"role":"user","content":"hi"} ] ,"stream":true}"#;
        let (openai, skip) = body(b, "Hel", PrefillForm::OpenAi).unwrap_or_default();
        assert_eq!(
            openai,
            r#"{"model":"m", "messages" : [ {"role":"user","content":"hi"},{"role":"system","content":"GO ON"},{"role":"assistant","content":"Hel"} ] ,"stream":true}"#
        );
        assert_eq!(skip, "");
        let (mistral, _) = body(b, "Hel", PrefillForm::Mistral).unwrap_or_default();
        assert!(mistral.contains(r#"},{"role":"assistant","content":"Hel","prefix":true} ]"#));
        assert!(!mistral.contains("GO ON"));
        let (anthropic, skip) = body(b, "Hello \n", PrefillForm::Anthropic).unwrap_or_default();
        assert!(anthropic.contains(r#"},{"role":"assistant","content":"Hello"} ]"#));
        assert_eq!(skip, " \n");
        // An empty list gets no comma; text is escaped.
        let (empty, _) =
            body(r#"{"messages":[]}"#, "a\"b", PrefillForm::Mistral).unwrap_or_default();
        assert_eq!(
            empty,
            r#"{"messages":[{"role":"assistant","content":"a\"b","prefix":true}]}"#
        );
    }

    #[test]
    fn requests_that_cannot_take_a_prefill() {
        let f = PrefillForm::OpenAi;
        assert!(body("not json", "a", f).is_err());
        assert!(body(r#"{"prompt":"x"}"#, "a", f).is_err());
        let ends_with_assistant =
            r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":"{"}]}"#;
        assert!(body(ends_with_assistant, "a", f).is_err());
        assert!(body(r#"{"n":2,"messages":[]}"#, "a", f).is_err());
        assert!(body(r#"{"messages":[]}"#, "  ", PrefillForm::Anthropic).is_err());
    }
}

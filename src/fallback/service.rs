use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::continuation::{ContinuationService, SendContinuation};
use super::future::{Chain, ResponseFuture};
use super::layer::Config;
use super::select::Choice;
use crate::budget::{DefaultEstimator, TokenEstimator};
use crate::context::{AttemptCap, RequestContext};
use crate::policy::{ClassActions, FallbackPolicy, PolicyError, RequestNeeds, RouteStrategy};
use crate::replay::{ReplayBody, Template};
use crate::{Body, BoxError, Error};

/// Middleware that sends a request to its primary route and, when that route has failed for
/// good with a failure the policy lets it route around, to the next approved backup route.
///
/// See the [module docs](crate::fallback) for the rules. Built by
/// [`FallbackLayer`](super::FallbackLayer) or [`Fallback::new`].
#[derive(Clone)]
pub struct Fallback<S> {
    pub(crate) inner: S,
    pub(crate) config: Arc<Config>,
    pub(crate) continuation: Option<Arc<dyn SendContinuation>>,
}

impl<S> Fallback<S> {
    /// Wraps `inner` with the chain in `policy` and the default per-class actions; fails with a
    /// [`PolicyError`] like [`FallbackLayer::new`](super::FallbackLayer::new).
    pub fn new(inner: S, policy: FallbackPolicy) -> Result<Self, PolicyError> {
        Ok(Self {
            inner,
            config: Arc::new(Config::new(policy, ClassActions::default())?),
            continuation: None,
        })
    }

    /// Lets the chain continue a stream cut after its commit point, as `stream.continuation`
    /// allows (see [`FallbackLayer::from_policy`](super::FallbackLayer::from_policy)): the
    /// served stream's body sends the continuation through a clone of the inner service,
    /// taken now, with requests of body type `B`.
    ///
    /// After the commit point every layer's future has returned and only the response body
    /// runs, so the body must hold what sends the continuation: a `Send + 'static` service.
    /// That is why this is a step of its own rather than a policy switch alone: a stack whose
    /// transport borrows (the `reqwest-middleware` one) cannot take it, and continuation is
    /// simply not available there.
    ///
    /// ```
    /// # use bytes::Bytes;
    /// # use http_body_util::Full;
    /// # use tower::ServiceBuilder;
    /// use tower_llm_resilience::policy::{ContinuationPolicy, Policy, PrefillForm, RouteConfig};
    /// use tower_llm_resilience::ResilienceLayer;
    ///
    /// # fn main() -> Result<(), tower_llm_resilience::PolicyError> {
    /// let mut policy = Policy::interactive();
    /// policy.stream.continuation = ContinuationPolicy::enabled();
    /// policy.fallback.routes.push(
    ///     RouteConfig::new("backup")
    ///         .base_url("https://backup.example/v1")
    ///         .model("backup-model")
    ///         .prefill(PrefillForm::OpenAi),
    /// );
    /// # let transport = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let mut client = ServiceBuilder::new()
    ///     .layer(ResilienceLayer::new(&policy)?)
    ///     .service(transport);
    /// // The budget layer is outermost; the fallback layer is right inside it.
    /// client.get_mut().enable_continuation::<Full<Bytes>>();
    /// # Ok(())
    /// # }
    /// ```
    pub fn enable_continuation<B>(&mut self) -> &mut Self
    where
        S: ContinuationService<B>,
    {
        self.continuation = Some(self.inner.continuation_sender().0);
        self
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming the middleware.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for Fallback<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("inner", &self.inner)
            .field("policy", &self.config.policy)
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for Fallback<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
    B: ReplayBody,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.config.classifier.error(e))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let config = self.config.clone();
        let (ctx, owner) = RequestContext::begin(&mut req, &config.logging);
        ctx.log().set_requested_route(config.primary.clone());
        // The copy every backup's request is made from. It shares the request's context.
        let hops = !config.routes.is_empty() && config.policy.max_hops > 0;
        // A continuation needs the caller's request too, hops or not.
        let continues = !config.routes.is_empty()
            && config.continuation.is_some()
            && self.continuation.is_some();
        // A strategy orders the request's routes; a backup it puts first is reached by a
        // request made from the template, like a hop's.
        let choice = config.selector.as_ref().and_then(|selector| {
            let estimate = (selector.strategy() == RouteStrategy::LowestCost).then(|| {
                let body = req.body().to_bytes();
                DefaultEstimator.estimate(req.headers(), body.as_deref())
            });
            selector.choose(estimate)
        });
        let chooses = choice.as_ref().is_some_and(Choice::leads_elsewhere);
        let hedges = config.hedger.as_ref().inspect(|h| h.deposit()).is_some();
        let template = if hops || continues || chooses || hedges {
            Template::of(&req)
        } else {
            None
        };
        let outer_fallback = ctx.write(|v| {
            v.tighten_attempt_cap(AttemptCap(config.policy.max_total_attempts));
            v.route = Some(config.primary.clone());
            let outer = v.fallback_available;
            v.fallback_available |= hops && template.is_some();
            outer
        });
        // Call the service that was driven to readiness; keep it for the hops, which clone it
        // again and wait for its readiness before each call.
        let clone = self.inner.clone();
        let svc = std::mem::replace(&mut self.inner, clone);
        let request_needs = config.reads_needs.then(|| needs_of(&req)).flatten();
        let mut chain = Chain::new(config, svc, template, ctx, owner, outer_fallback);
        chain.continuation = self.continuation.clone();
        chain.request_needs = request_needs;
        if let Some(choice) = choice {
            chain.follow(choice);
        }
        ResponseFuture::start(chain, req)
    }
}

/// What `req` needs of its route: the caller's [`RequestNeeds`] extension, else read from its
/// body (in memory) with the default token estimate; `None` when neither can say.
fn needs_of<B: ReplayBody>(req: &Request<B>) -> Option<RequestNeeds> {
    if let Some(needs) = req.extensions().get::<RequestNeeds>() {
        return Some(*needs);
    }
    let body = req.body().to_bytes()?;
    let estimate = DefaultEstimator.estimate(req.headers(), Some(&body));
    RequestNeeds::of_body(&body, estimate.total())
}

use std::collections::BTreeMap;
use std::fmt;

use super::capabilities::Capabilities;
use super::error::{PolicyError, check};
use super::selection::{RouteStrategy, SelectionPolicy};

/// Headers that carry credentials; a route that sets or removes one must be approved.
///
/// A route whose `base_url` moves the request to another host strips these from the caller's
/// request unless the route's credentials are approved: a key meant for one provider never
/// reaches another by accident.
pub const CREDENTIAL_HEADERS: [&str; 5] = [
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "proxy-authorization",
];

/// One backup route: a name and how the request is rewritten for it.
#[derive(Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct RouteConfig {
    /// Name in logs, in the breaker's state and in the `x-llm-route` of served responses.
    pub name: String,
    /// New scheme, authority and path prefix, e.g. `https://backup.example/v1`. Unchanged when
    /// `None`.
    ///
    /// The base path and the request's path are joined so that the segments the base path ends
    /// with and the request path starts with are written once: `https://backup.example/v1` with
    /// a request for `/v1/chat/completions` goes to `https://backup.example/v1/chat/completions`;
    /// `https://gw.example/openai/v1` to `https://gw.example/openai/v1/chat/completions`;
    /// `https://gw.example/proxy` to `https://gw.example/proxy/v1/chat/completions`. The
    /// request's query is kept (after the base URL's own query, if it has one).
    pub base_url: Option<String>,
    /// New value of the `model` field of a JSON request body. Unchanged when `None`.
    ///
    /// Only the value of the top-level `model` string is replaced; every other byte of the body
    /// stays as it was. When the body is not a JSON object with one top-level string `model`,
    /// the route is skipped for that request (and the skip is logged) rather than called with
    /// the wrong model.
    pub model: Option<String>,
    /// Headers set on the request (replacing any value it had), after `remove_headers`.
    pub set_headers: BTreeMap<String, String>,
    /// Headers removed from the request.
    pub remove_headers: Vec<String>,
    /// The route serves a larger context window: context overflows may switch to it.
    pub larger_context: bool,
    /// Whose budget the route spends; exhausted quota may only switch to a route whose owner is
    /// listed in [`FallbackPolicy::approved_budget_owners`].
    pub budget_owner: Option<String>,
    /// The route changes credentials (sets or removes a [`CREDENTIAL_HEADERS`] header) and the
    /// policy approves it; without this, such a route is rejected. It also lets the caller's
    /// credentials follow the request to a `base_url` on another host; without it they are
    /// stripped there.
    pub credentials_approved: bool,
    /// The route accepts a partial answer as an assistant prefill and continues it: a stream
    /// cut after its commit point may be finished here (see
    /// [`ContinuationPolicy`](crate::policy::ContinuationPolicy)). Needs
    /// [`prefill_form`](Self::prefill_form). A route without it is never sent a prefill.
    pub supports_prefill: bool,
    /// How the prefill is written for this route; required with `supports_prefill`.
    pub prefill_form: Option<PrefillForm>,
    /// What the route can serve; a request that needs more skips it.
    pub capabilities: Capabilities,
    /// The route is served in the process by a tower service the application registers
    /// (`FallbackLayer::route_service`): a rule-based responder, a cache, a local model's
    /// client. It has no `base_url`. Until a service is registered the route is skipped.
    pub in_process: bool,
    /// The route's weight under the `weighted` selection strategy; 1 when unset, 0 to try it
    /// only after every route with a weight.
    pub weight: Option<u32>,
}

/// How a partial answer is handed to a route as a prefill. The request keeps its API's shape
/// (routes rewrite the URL, the model and headers, never the body's format), so the form
/// follows the API the caller speaks, plus what the route's model accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum PrefillForm {
    /// Anthropic Messages: a final assistant message is a native prefill. Its trailing
    /// whitespace is left out (the API rejects it) and dropped from the start of the
    /// continuation instead.
    Anthropic,
    /// OpenAI-compatible chat: the assistant message last, after a system message with the
    /// policy's instruction to continue exactly where it ends.
    #[cfg_attr(feature = "serde", serde(rename = "openai"))]
    OpenAi,
    /// OpenAI-compatible chat on Mistral: the assistant message last with `"prefix": true`, a
    /// native prefill (no instruction).
    Mistral,
}

impl RouteConfig {
    /// A route that rewrites nothing yet.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Builder: the new base URL.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// Builder: the new `model`.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Builder: set a header.
    pub fn set_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_headers.insert(name.into(), value.into());
        self
    }

    /// Builder: remove a header.
    pub fn remove_header(mut self, name: impl Into<String>) -> Self {
        self.remove_headers.push(name.into());
        self
    }

    /// Builder: mark as larger-context.
    pub fn larger_context(mut self) -> Self {
        self.larger_context = true;
        self
    }

    /// Builder: the budget owner.
    pub fn budget_owner(mut self, owner: impl Into<String>) -> Self {
        self.budget_owner = Some(owner.into());
        self
    }

    /// Builder: served in the process by a registered service (see
    /// [`in_process`](Self::in_process)).
    pub fn in_process(mut self) -> Self {
        self.in_process = true;
        self
    }

    /// Builder: what the route can serve.
    pub fn capabilities(mut self, capabilities: Capabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    /// Builder: the route's weight under the `weighted` selection strategy.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Builder: approve the route's credential change.
    pub fn approve_credentials(mut self) -> Self {
        self.credentials_approved = true;
        self
    }

    /// Builder: the route accepts a prefill in `form` (sets `supports_prefill`).
    pub fn prefill(mut self, form: PrefillForm) -> Self {
        self.supports_prefill = true;
        self.prefill_form = Some(form);
        self
    }

    /// Whether the route sets or removes a credential header.
    pub fn changes_credentials(&self) -> bool {
        self.credential_change().is_some()
    }

    /// The list (`set_headers` or `remove_headers`) that changes a credential header, if any.
    fn credential_change(&self) -> Option<&'static str> {
        let is_cred = |h: &str| CREDENTIAL_HEADERS.iter().any(|c| c.eq_ignore_ascii_case(h));
        if self.set_headers.keys().any(|h| is_cred(h)) {
            Some("set_headers")
        } else if self.remove_headers.iter().any(|h| is_cred(h)) {
            Some("remove_headers")
        } else {
            None
        }
    }
}

// Header values may be keys: never print them.
impl fmt::Debug for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set: Vec<(&str, &str)> = self
            .set_headers
            .keys()
            .map(|k| (k.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("RouteConfig")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("set_headers", &set)
            .field("remove_headers", &self.remove_headers)
            .field("larger_context", &self.larger_context)
            .field("budget_owner", &self.budget_owner)
            .field("credentials_approved", &self.credentials_approved)
            .field("supports_prefill", &self.supports_prefill)
            .field("prefill_form", &self.prefill_form)
            .field("capabilities", &self.capabilities)
            .field("in_process", &self.in_process)
            .field("weight", &self.weight)
            .finish()
    }
}

/// A fixed answer served when every route has failed, clearly marked as such.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct StaticResponse {
    /// HTTP status.
    pub status: u16,
    /// `content-type` of the body.
    #[cfg_attr(feature = "serde", serde(default = "default_content_type"))]
    pub content_type: String,
    /// Body.
    pub body: String,
}

#[cfg(feature = "serde")]
fn default_content_type() -> String {
    "application/json".to_owned()
}

impl StaticResponse {
    /// A JSON answer.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "application/json".to_owned(),
            body: body.into(),
        }
    }
}

/// The route chain: the second rung of the ladder.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct FallbackPolicy {
    /// Name of the primary route (the request as the caller built it).
    pub primary: String,
    /// Budget owner of the primary route.
    pub primary_budget_owner: Option<String>,
    /// What the primary route can serve; a request that needs more goes to a backup that can.
    pub primary_capabilities: Capabilities,
    /// Backup routes, in the order they are tried (under the `ordered` strategy).
    pub routes: Vec<RouteConfig>,
    /// How the chain orders its routes for each request.
    pub selection: SelectionPolicy,
    /// Most route switches per request.
    pub max_hops: u32,
    /// Most transport attempts per request across the whole chain.
    pub max_total_attempts: u32,
    /// Budget owners an exhausted quota may switch to.
    pub approved_budget_owners: Vec<String>,
    /// Models a route may select; every route's model must be listed when non-empty.
    pub allowed_models: Vec<String>,
    /// Models no route may select.
    pub blocked_models: Vec<String>,
    /// Served when every route has failed; the caller gets the primary's failure when `None`.
    pub last_resort: Option<StaticResponse>,
}

impl Default for FallbackPolicy {
    fn default() -> Self {
        Self {
            primary: "primary".to_owned(),
            primary_budget_owner: None,
            primary_capabilities: Capabilities::default(),
            routes: Vec::new(),
            selection: SelectionPolicy::default(),
            max_hops: 2,
            max_total_attempts: 6,
            approved_budget_owners: Vec::new(),
            allowed_models: Vec::new(),
            blocked_models: Vec::new(),
            last_resort: None,
        }
    }
}

impl FallbackPolicy {
    /// Checks every value, including that no route changes credentials without approval;
    /// see [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.primary.trim().is_empty() {
            return Err(PolicyError::new("fallback.primary", "must not be empty"));
        }
        check::at_least_one(
            "fallback.max_total_attempts",
            self.max_total_attempts.into(),
        )?;
        // Route names travel in the `x-llm-route` response header.
        let header_safe = |field: String, name: &str| {
            if !name.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
                return Err(PolicyError::new(
                    field,
                    format!("{name:?} must be visible ASCII (it is sent in a header)"),
                ));
            }
            Ok(())
        };
        header_safe("fallback.primary".to_owned(), &self.primary)?;
        let mut names = vec![self.primary.as_str()];
        for (i, r) in self.routes.iter().enumerate() {
            let at = |f: &str| format!("fallback.routes[{i}].{f}");
            if r.name.trim().is_empty() {
                return Err(PolicyError::new(at("name"), "must not be empty"));
            }
            if names.contains(&r.name.as_str()) {
                return Err(PolicyError::new(
                    at("name"),
                    format!("{:?} names two routes", r.name),
                ));
            }
            header_safe(at("name"), &r.name)?;
            names.push(&r.name);
            if r.in_process && r.base_url.is_some() {
                return Err(PolicyError::new(
                    at("base_url"),
                    "an in-process route has no URL: its service answers in the process",
                ));
            }
            if let Some(url) = &r.base_url {
                let uri: http::Uri = url.parse().map_err(|_| {
                    PolicyError::new(at("base_url"), format!("{url:?} is not a URL"))
                })?;
                if uri.scheme().is_none() || uri.authority().is_none() {
                    return Err(PolicyError::new(
                        at("base_url"),
                        format!("{url:?} needs a scheme and a host"),
                    ));
                }
            }
            for (name, value) in &r.set_headers {
                check::header_name(&at("set_headers"), name)?;
                if http::HeaderValue::from_str(value).is_err() {
                    return Err(PolicyError::new(
                        at("set_headers"),
                        format!("the value of {name:?} is not a valid header value"),
                    ));
                }
            }
            for name in &r.remove_headers {
                check::header_name(&at("remove_headers"), name)?;
            }
            if let Some(list) = r.credential_change().filter(|_| !r.credentials_approved) {
                return Err(PolicyError::new(
                    at(list),
                    format!(
                        "route {:?} changes credentials; set `credentials_approved = true` to allow it",
                        r.name
                    ),
                ));
            }
            match (r.supports_prefill, r.prefill_form) {
                (true, None) => {
                    return Err(PolicyError::new(
                        at("prefill_form"),
                        "must name the wire form of the prefill (anthropic, openai or mistral) when `supports_prefill` is set",
                    ));
                }
                (false, Some(_)) => {
                    return Err(PolicyError::new(
                        at("supports_prefill"),
                        "must be set for a route that names a `prefill_form`",
                    ));
                }
                _ => {}
            }
            if let Some(model) = &r.model {
                if self.blocked_models.iter().any(|m| m == model) {
                    return Err(PolicyError::new(
                        at("model"),
                        format!("{model:?} is in `fallback.blocked_models`"),
                    ));
                }
                if !self.allowed_models.is_empty()
                    && !self.allowed_models.iter().any(|m| m == model)
                {
                    return Err(PolicyError::new(
                        at("model"),
                        format!("{model:?} is not in `fallback.allowed_models`"),
                    ));
                }
            }
        }
        self.selection.validate()?;
        if self.selection.strategy == RouteStrategy::Weighted {
            let total = self
                .routes
                .iter()
                .map(|r| u64::from(r.weight.unwrap_or(1)))
                .sum::<u64>()
                + u64::from(self.selection.primary_weight);
            if total == 0 {
                return Err(PolicyError::new(
                    "fallback.selection.primary_weight",
                    "every route's weight is 0: the `weighted` strategy needs one above 0",
                ));
            }
        }
        if let Some(last) = &self.last_resort {
            if http::StatusCode::from_u16(last.status).is_err() {
                return Err(PolicyError::new(
                    "fallback.last_resort.status",
                    format!("{} is not an HTTP status", last.status),
                ));
            }
            if http::HeaderValue::from_str(&last.content_type).is_err() {
                return Err(PolicyError::new(
                    "fallback.last_resort.content_type",
                    "is not a valid header value",
                ));
            }
        }
        Ok(())
    }
}

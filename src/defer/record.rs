use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Uri};

use crate::classify::FailureClass;
use crate::policy::{CREDENTIAL_HEADERS, DeferPolicy};

/// A request written down to be sent later: everything needed to replay it, and nothing that
/// is a credential.
///
/// Made by the budget layer when a request of a policy with a `budget.defer` section ends on a
/// transient failure it could not wait out; replayed by a [`DeferredWorker`](super::DeferredWorker)
/// once [`next_attempt_at`](Self::next_attempt_at) has come.
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct DeferredRequest {
    /// The record's id: the caller's handle on the deferred work.
    pub id: String,
    /// The idempotency key every replay is sent with (the request's own, or one set for it).
    pub idempotency_key: String,
    /// Who asked: a [`Requester`] extension, else the policy's `requester_header`, else the
    /// budget owner.
    pub requester: Option<String>,
    /// The budget owner whose spend cap pays for the replays.
    pub budget_owner: Option<String>,
    /// The fingerprint of the credential the request carried
    /// ([`key_fingerprint`](crate::observe::key_fingerprint)), never the credential: the
    /// replay is given its credential again by the route (or the worker's
    /// [`credentials`](super::DeferredWorker::credentials) hook).
    pub key_fingerprint: Option<String>,
    /// The policy the request ran under: its `workflow` name.
    pub workflow: String,
    /// The route the request asked for.
    pub route: String,
    /// The model the request asked for (its body's top-level `model`).
    pub model: Option<String>,
    /// How often the request has been deferred before this record (0 for the first).
    pub deferrals: u32,
    /// When the request was first deferred, in milliseconds since the Unix epoch.
    pub queued_at_ms: u64,
    /// When the next replay is due, in milliseconds since the Unix epoch.
    pub next_attempt_at_ms: u64,
    /// Why it was deferred (the last time).
    pub reason: DeferReason,
    /// The request method.
    pub method: String,
    /// The request URI, without credential query parameters (`key`, `api_key`).
    pub uri: String,
    /// The request headers, without credential headers.
    pub headers: Vec<(String, String)>,
    /// The request body.
    #[cfg_attr(feature = "serde", serde(with = "body_serde"))]
    pub body: Bytes,
}

/// Why a request was deferred.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct DeferReason {
    /// The failure class.
    pub class: FailureClass,
    /// The route that failed (or that admission turned away).
    pub route: String,
    /// The provider's status, when it answered.
    pub status: Option<u16>,
}

impl DeferredRequest {
    /// When the request was first deferred.
    pub fn queued_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.queued_at_ms)
    }

    /// When the next replay is due.
    pub fn next_attempt_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.next_attempt_at_ms)
    }

    /// What the caller is told of this record, due `retry_in` from now.
    pub(crate) fn deferred(&self, retry_in: Duration) -> Deferred {
        Deferred {
            id: self.id.clone(),
            next_attempt_at: self.next_attempt_at(),
            retry_in,
        }
    }

    /// The request to replay, with a body of type `B`; `None` when the record does not make a
    /// valid request (a sink handed back something the crate did not write) or `B` cannot be
    /// built from bytes.
    pub fn to_request<B: crate::replay::ReplayBody>(&self) -> Option<http::Request<B>> {
        let mut req = http::Request::new(B::from_bytes(self.body.clone())?);
        *req.method_mut() = Method::from_bytes(self.method.as_bytes()).ok()?;
        *req.uri_mut() = self.uri.parse().ok()?;
        let headers = req.headers_mut();
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            headers.append(name, value.parse().ok()?);
        }
        Some(req)
    }

    /// The record as JSON without its body (for a sink that keeps the body apart).
    pub fn meta_json(&self) -> String {
        serde_json::json!({
            "id": self.id,
            "idempotency_key": self.idempotency_key,
            "requester": self.requester,
            "budget_owner": self.budget_owner,
            "key_fingerprint": self.key_fingerprint,
            "workflow": self.workflow,
            "route": self.route,
            "model": self.model,
            "deferrals": self.deferrals,
            "queued_at_ms": self.queued_at_ms,
            "next_attempt_at_ms": self.next_attempt_at_ms,
            "reason": {
                "class": self.reason.class.as_str(),
                "route": self.reason.route,
                "status": self.reason.status,
            },
            "method": self.method,
            "uri": self.uri,
            "headers": self.headers,
        })
        .to_string()
    }

    /// A record from [`meta_json`](Self::meta_json) and its body; `None` when the JSON is not
    /// such a record.
    pub fn from_meta_json(json: &[u8], body: Bytes) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(json).ok()?;
        let text = |k: &str| v.get(k)?.as_str().map(str::to_owned);
        let opt = |k: &str| match v.get(k) {
            Some(serde_json::Value::String(s)) => Some(Some(s.clone())),
            Some(serde_json::Value::Null) | None => Some(None),
            _ => None,
        };
        let num = |k: &str| v.get(k)?.as_u64();
        let r = v.get("reason")?;
        let headers = v
            .get("headers")?
            .as_array()?
            .iter()
            .map(|pair| {
                let pair = pair.as_array()?;
                let name = pair.first()?.as_str()?.to_owned();
                let value = pair.get(1)?.as_str()?.to_owned();
                Some((name, value))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            id: text("id")?,
            idempotency_key: text("idempotency_key")?,
            requester: opt("requester")?,
            budget_owner: opt("budget_owner")?,
            key_fingerprint: opt("key_fingerprint")?,
            workflow: text("workflow")?,
            route: text("route")?,
            model: opt("model")?,
            deferrals: u32::try_from(num("deferrals")?).ok()?,
            queued_at_ms: num("queued_at_ms")?,
            next_attempt_at_ms: num("next_attempt_at_ms")?,
            reason: DeferReason {
                class: FailureClass::from_name(r.get("class")?.as_str()?)?,
                route: r.get("route")?.as_str()?.to_owned(),
                status: match r.get("status")? {
                    serde_json::Value::Null => None,
                    s => Some(u16::try_from(s.as_u64()?).ok()?),
                },
            },
            method: text("method")?,
            uri: text("uri")?,
            headers,
            body,
        })
    }
}

// Metadata only: the body is a prompt, and the headers are the caller's.
impl fmt::Debug for DeferredRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferredRequest")
            .field("id", &self.id)
            .field("route", &self.route)
            .field("model", &self.model)
            .field("deferrals", &self.deferrals)
            .field("queued_at_ms", &self.queued_at_ms)
            .field("next_attempt_at_ms", &self.next_attempt_at_ms)
            .field("reason", &self.reason)
            .field("body_bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "serde")]
mod body_serde {
    use bytes::Bytes;

    // Request bodies of model APIs are JSON text; bytes that are not UTF-8 go as an array.
    pub(super) fn serialize<S: serde::Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.serialize_bytes(b),
        }
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Bytes(Vec<u8>),
        }
        Ok(match <Repr as serde::Deserialize>::deserialize(d)? {
            Repr::Text(t) => Bytes::from(t),
            Repr::Bytes(b) => Bytes::from(b),
        })
    }
}

/// What the caller gets for a deferred request: the record's id and when it is due.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Deferred {
    /// The record's id.
    pub id: String,
    /// When the replay is due.
    pub next_attempt_at: SystemTime,
    /// How long from now that is.
    pub retry_in: Duration,
}

/// Who asked for a request, for its deferred record (takes precedence over the policy's
/// `requester_header`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester(pub String);

/// What a request kept for its record, should it be deferred: taken when the request came in,
/// before any layer changed it.
pub(crate) struct Parked {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    requester: Option<String>,
}

/// The request being replayed by a worker: its record, and where the stack leaves the record
/// of a new deferral (the worker reschedules it in the sink with the lease it holds).
#[derive(Clone)]
pub(crate) struct Replaying {
    pub(crate) record: Arc<DeferredRequest>,
    pub(crate) again: Arc<Mutex<Option<Again>>>,
}

/// What the stack decided about a replay that failed on a class the policy defers.
pub(crate) enum Again {
    /// Deferred once more: the record with its new due time.
    Deferred(Box<DeferredRequest>),
    /// Not deferred: the record has been deferred `max_deferrals` times.
    Exhausted,
}

/// The decision point's settings, made from the policy once.
pub(crate) struct DeferConfig {
    pub(crate) policy: DeferPolicy,
    pub(crate) sink: Arc<dyn super::DeferSink>,
    pub(crate) workflow: String,
    pub(crate) key_header: HeaderName,
    requester_header: HeaderName,
    strip: Vec<HeaderName>,
    keys: crate::retry::KeyGenerator,
}

/// Query parameters that carry a key (Gemini's `?key=`).
const CREDENTIAL_QUERY: [&str; 4] = ["key", "api_key", "api-key", "access_token"];

impl DeferConfig {
    pub(crate) fn new(
        policy: DeferPolicy,
        sink: Arc<dyn super::DeferSink>,
        workflow: String,
        key_header: Option<&str>,
    ) -> Self {
        let header = |h: &str| HeaderName::from_bytes(h.as_bytes()).ok();
        let strip = CREDENTIAL_HEADERS
            .iter()
            .copied()
            .chain(policy.strip_headers.iter().map(String::as_str))
            .filter_map(header)
            .collect();
        Self {
            requester_header: header(&policy.requester_header)
                .unwrap_or(HeaderName::from_static("x-llm-requester")),
            key_header: key_header
                .and_then(header)
                .unwrap_or(crate::policy::idempotency::CONVENTIONAL_KEY_HEADER),
            strip,
            keys: crate::retry::KeyGenerator::new(),
            sink,
            workflow,
            policy,
        }
    }

    /// What `req` keeps for its record; `None` when it could not be replayed from a record
    /// (its body is not in memory, or is larger than the policy allows). Sets the idempotency
    /// key the record will carry, so that the first attempt is sent with it too.
    pub(crate) fn park<B: crate::replay::ReplayBody>(
        &self,
        req: &mut http::Request<B>,
    ) -> Option<Parked> {
        let body = req.body().to_bytes()?;
        if body.len() as u64 > self.policy.max_body_bytes {
            return None;
        }
        if !req.headers().contains_key(&self.key_header) {
            let key = self.keys.next()?;
            req.headers_mut().insert(self.key_header.clone(), key);
        }
        let requester = req
            .extensions()
            .get::<Requester>()
            .map(|r| r.0.clone())
            .or_else(|| {
                let v = req.headers().get(&self.requester_header)?.to_str().ok()?;
                Some(v.trim().to_owned())
            });
        Some(Parked {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
            body,
            requester,
        })
    }

    /// The record for a request parked as `parked` that failed with `reason`; `None` when it
    /// cannot be written down losslessly (a header that is not text).
    pub(crate) fn record(
        &self,
        parked: &Parked,
        route: &str,
        budget_owner: Option<String>,
        reason: DeferReason,
        retry_in: Duration,
    ) -> Option<DeferredRequest> {
        let mut headers = Vec::with_capacity(parked.headers.len());
        let mut fingerprint = None;
        for (name, value) in &parked.headers {
            if self.strip.contains(name) {
                if fingerprint.is_none() && CREDENTIAL_HEADERS.contains(&name.as_str()) {
                    let key = value.to_str().ok()?;
                    fingerprint = Some(crate::observe::key_fingerprint(key));
                }
                continue;
            }
            headers.push((name.as_str().to_owned(), value.to_str().ok()?.to_owned()));
        }
        let idempotency_key = parked.headers.get(&self.key_header)?.to_str().ok()?;
        let (uri, query_key) = without_credentials(&parked.uri);
        if fingerprint.is_none() {
            fingerprint = query_key.map(|k| crate::observe::key_fingerprint(&k));
        }
        let now = now_ms();
        Some(DeferredRequest {
            id: format!(
                "{:016x}{:08x}",
                crate::store::unique_id(),
                now & 0xffff_ffff
            ),
            idempotency_key: idempotency_key.to_owned(),
            requester: parked.requester.clone().or_else(|| budget_owner.clone()),
            budget_owner,
            key_fingerprint: fingerprint,
            workflow: self.workflow.clone(),
            route: route.to_owned(),
            model: model_of(&parked.body),
            deferrals: 0,
            queued_at_ms: now,
            next_attempt_at_ms: now.saturating_add(millis(retry_in)),
            reason,
            method: parked.method.as_str().to_owned(),
            uri,
            headers,
            body: parked.body.clone(),
        })
    }

    /// When a request that failed with `hint` is replayed after `deferrals` earlier
    /// deferrals ([`DeferPolicy::replay_in`]).
    pub(crate) fn retry_in(&self, hint: Option<Duration>, deferrals: u32) -> Duration {
        self.policy.replay_in(hint, deferrals)
    }
}

/// The URI without credential query parameters, and the first such parameter's value.
fn without_credentials(uri: &Uri) -> (String, Option<String>) {
    let Some(query) = uri.query() else {
        return (uri.to_string(), None);
    };
    let mut key = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            let credential = CREDENTIAL_QUERY.contains(&name);
            if credential && key.is_none() {
                key = pair.split_once('=').map(|(_, v)| v.to_owned());
            }
            !credential
        })
        .collect();
    let path = uri.path();
    let base = match (uri.scheme_str(), uri.authority()) {
        (Some(s), Some(a)) => format!("{s}://{a}{path}"),
        _ => path.to_owned(),
    };
    let uri = if kept.is_empty() {
        base
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (uri, key)
}

/// The body's top-level `model`, read without building the whole document.
fn model_of(body: &[u8]) -> Option<String> {
    #[derive(Default)]
    struct Model(Option<String>);
    impl<'de> serde::Deserialize<'de> for Model {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Model;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Model, A::Error> {
                    let mut model = None;
                    while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                        if key == "model" && model.is_none() {
                            model = map.next_value::<Option<String>>()?;
                        } else {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                    Ok(Model(model))
                }
            }
            d.deserialize_map(Visit)
        }
    }
    serde_json::from_slice::<Model>(body).ok()?.0
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch, on the tokio clock: wall time as the process saw it
/// first, moved on by the tokio clock since (so a paused clock in a test moves it too, for
/// every record and worker of the process alike).
pub(crate) fn now_ms() -> u64 {
    static ANCHOR: OnceLock<(SystemTime, std::time::Instant)> = OnceLock::new();
    let (wall, at) = *ANCHOR.get_or_init(|| (SystemTime::now(), std::time::Instant::now()));
    let base = wall
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128;
    let now = tokio::time::Instant::now().into_std();
    // Signed nanoseconds, floored once: the same instant gives the same millisecond whether
    // it lies before the anchor or after it.
    let ahead = match now.checked_duration_since(at) {
        Some(d) => d.as_nanos() as i128,
        None => -(at.saturating_duration_since(now).as_nanos() as i128),
    };
    u64::try_from((base + ahead).div_euclid(1_000_000)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_query_parameters_are_left_out_and_fingerprinted() {
        let uri: Uri = "http://127.0.0.1:1/v1beta/models/g:generateContent?alt=sse&key=AIza-secret"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let (kept, key) = without_credentials(&uri);
        assert_eq!(
            kept,
            "http://127.0.0.1:1/v1beta/models/g:generateContent?alt=sse"
        );
        assert_eq!(key.as_deref(), Some("AIza-secret"));
    }

    #[test]
    fn the_model_is_read_from_the_top_level_only() {
        let body = br#"{"messages":[{"model":"inner"}],"model":"gpt-4o","stream":true}"#;
        assert_eq!(model_of(body).as_deref(), Some("gpt-4o"));
        assert_eq!(model_of(b"not json"), None);
        assert_eq!(model_of(br#"{"model":7}"#), None);
    }

    #[test]
    fn a_record_survives_its_json_form() {
        let record = DeferredRequest {
            id: "r1".into(),
            idempotency_key: "k".into(),
            requester: Some("alice".into()),
            budget_owner: None,
            key_fingerprint: Some("sha256:0011".into()),
            workflow: "batch".into(),
            route: "openai".into(),
            model: Some("gpt-4o".into()),
            deferrals: 2,
            queued_at_ms: 5,
            next_attempt_at_ms: 600_005,
            reason: DeferReason {
                class: FailureClass::RateLimited,
                route: "openai".into(),
                status: Some(429),
            },
            method: "POST".into(),
            uri: "http://127.0.0.1:1/v1/chat/completions".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(b"{}"),
        };
        let back =
            DeferredRequest::from_meta_json(record.meta_json().as_bytes(), record.body.clone());
        assert_eq!(back.as_ref(), Some(&record));
        assert_eq!(
            DeferredRequest::from_meta_json(b"{\"id\":1}", Bytes::new()),
            None
        );
        assert_eq!(
            DeferredRequest::from_meta_json(b"\xff garbage", Bytes::new()),
            None
        );
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let p = DeferPolicy::default();
        assert_eq!(p.delay(0), Duration::from_secs(60));
        assert_eq!(p.delay(1), Duration::from_secs(120));
        assert_eq!(p.delay(40), Duration::from_secs(3600));
    }
}

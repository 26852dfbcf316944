//! A backup route as the layer uses it: the policy's `RouteConfig`, parsed once, and the
//! request rewrite it stands for.

use std::fmt;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Request, Uri};

use crate::RouteName;
use crate::policy::{CREDENTIAL_HEADERS, Capabilities, PolicyError, PrefillForm, RouteConfig};
use crate::replay::ReplayBody;

/// A backup route, parsed from its [`RouteConfig`] when the layer is built.
#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) name: RouteName,
    pub(crate) name_header: HeaderValue,
    base: Option<BaseUrl>,
    /// The new model, already encoded as a JSON string (quotes and escapes included).
    model_json: Option<Bytes>,
    set_headers: Vec<(HeaderName, HeaderValue)>,
    remove_headers: Vec<HeaderName>,
    pub(crate) larger_context: bool,
    pub(crate) budget_owner: Option<String>,
    pub(crate) capabilities: Capabilities,
    /// Served in the process: `Some` once its service is registered.
    pub(crate) in_process: bool,
    pub(crate) local: Option<super::local::LocalRoute>,
    credentials_approved: bool,
    /// How a continuation's prefill is written for the route; `None`: it is never sent one.
    pub(crate) prefill: Option<PrefillForm>,
}

impl fmt::Debug for Route {
    // Header values may be keys: only names are printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("base", &self.base)
            .field("rewrites_model", &self.model_json.is_some())
            .field(
                "set_headers",
                &self.set_headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("remove_headers", &self.remove_headers)
            .field("larger_context", &self.larger_context)
            .field("budget_owner", &self.budget_owner)
            .field("prefill", &self.prefill)
            .finish()
    }
}

#[derive(Debug, Clone)]
struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    /// Path segments, without empty ones (`/openai/v1/` is `["openai", "v1"]`).
    segments: Vec<String>,
    query: Option<String>,
}

/// Why a route could not be used for a request; the route is skipped, never half-rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SkipReason {
    /// The body is not in memory, or its type cannot be rebuilt from bytes.
    BodyNotRewritable,
    /// The body is not a JSON object.
    NotJson,
    /// The JSON object has no top-level `model` field holding a string.
    NoModelField,
    /// The JSON object has more than one top-level `model` field.
    DuplicateModelField,
    /// The rewritten URI is not a valid URI.
    InvalidUri,
}

impl SkipReason {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            SkipReason::BodyNotRewritable => "request body cannot be rewritten",
            SkipReason::NotJson => "request body is not a JSON object",
            SkipReason::NoModelField => "request body has no top-level string `model`",
            SkipReason::DuplicateModelField => "request body has two top-level `model` fields",
            SkipReason::InvalidUri => "rewritten URI is invalid",
        }
    }
}

pub(crate) fn header_value_of_name(field: &str, name: &str) -> Result<HeaderValue, PolicyError> {
    HeaderValue::from_str(name).map_err(|_| {
        PolicyError::new(
            field,
            format!("{name:?} cannot be sent in the `x-llm-route` header (use visible ASCII)"),
        )
    })
}

impl Route {
    /// Parses a validated route; `at` is its field path for errors.
    pub(crate) fn new(at: &str, config: &RouteConfig) -> Result<Self, PolicyError> {
        let base = match &config.base_url {
            None => None,
            Some(url) => Some(parse_base(&format!("{at}.base_url"), url)?),
        };
        let model_json = match &config.model {
            None => None,
            Some(m) => {
                Some(Bytes::from(serde_json::to_string(m).map_err(|e| {
                    PolicyError::new(format!("{at}.model"), e.to_string())
                })?))
            }
        };
        let mut set_headers = Vec::with_capacity(config.set_headers.len());
        for (name, value) in &config.set_headers {
            let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                PolicyError::new(
                    format!("{at}.set_headers"),
                    format!("{name:?} is not a valid header name"),
                )
            })?;
            let mut v = HeaderValue::from_str(value).map_err(|_| {
                PolicyError::new(
                    format!("{at}.set_headers"),
                    format!("the value of {name:?} is not a valid header value"),
                )
            })?;
            // Keeps keys out of debug output and HTTP/2 header compression tables.
            if CREDENTIAL_HEADERS.contains(&n.as_str()) {
                v.set_sensitive(true);
            }
            set_headers.push((n, v));
        }
        let mut remove_headers = Vec::with_capacity(config.remove_headers.len());
        for name in &config.remove_headers {
            remove_headers.push(HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                PolicyError::new(
                    format!("{at}.remove_headers"),
                    format!("{name:?} is not a valid header name"),
                )
            })?);
        }
        Ok(Self {
            name: RouteName::new(&config.name),
            name_header: header_value_of_name(&format!("{at}.name"), &config.name)?,
            base,
            model_json,
            set_headers,
            remove_headers,
            larger_context: config.larger_context,
            capabilities: config.capabilities,
            in_process: config.in_process,
            local: None,
            budget_owner: config.budget_owner.clone(),
            credentials_approved: config.credentials_approved,
            prefill: config.prefill_form.filter(|_| config.supports_prefill),
        })
    }

    /// Rewrites `req` for this route: URI, `host` header if present, `model`, headers,
    /// `content-length`. On error `req` may be partly rewritten and must be dropped.
    pub(crate) fn rewrite<B: ReplayBody>(&self, req: &mut Request<B>) -> Result<(), SkipReason> {
        if let Some(model) = &self.model_json {
            let bytes = req.body().to_bytes().ok_or(SkipReason::BodyNotRewritable)?;
            let new = replace_model(&bytes, model)?;
            let len = new.len();
            *req.body_mut() = B::from_bytes(new).ok_or(SkipReason::BodyNotRewritable)?;
            if req.headers().contains_key(CONTENT_LENGTH) {
                req.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(len));
            }
        }
        if let Some(base) = &self.base {
            let moved = req.uri().authority() != Some(&base.authority);
            let uri = rebase(base, req.uri()).ok_or(SkipReason::InvalidUri)?;
            *req.uri_mut() = uri;
            // The caller's credentials were meant for the primary's host: they follow the
            // request to another host only when the policy approved the route's credentials.
            if moved && !self.credentials_approved {
                for name in CREDENTIAL_HEADERS {
                    req.headers_mut().remove(name);
                }
            }
            if req.headers().contains_key(HOST) {
                let host = HeaderValue::from_str(base.authority.as_str())
                    .map_err(|_| SkipReason::InvalidUri)?;
                req.headers_mut().insert(HOST, host);
            }
        }
        // Removed first, so a header both removed and set ends up with the set value.
        for name in &self.remove_headers {
            req.headers_mut().remove(name);
        }
        for (name, value) in &self.set_headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        Ok(())
    }
}

fn parse_base(field: &str, url: &str) -> Result<BaseUrl, PolicyError> {
    let bad = |why: &str| PolicyError::new(field, format!("{url:?} {why}"));
    let uri: Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    let parts = uri.into_parts();
    let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
        return Err(bad("needs a scheme and a host"));
    };
    let (segments, query) = match parts.path_and_query {
        Some(pq) => (
            pq.path()
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            pq.query().filter(|q| !q.is_empty()).map(str::to_owned),
        ),
        None => (Vec::new(), None),
    };
    Ok(BaseUrl {
        scheme,
        authority,
        segments,
        query,
    })
}

/// The request URI moved onto `base`.
///
/// The base path and the request path are joined so that the segments the base path ends with
/// and the request path starts with are written once: the longest run of trailing base segments
/// equal to the leading request segments is merged. `https://b.example/v1` and
/// `/v1/chat/completions` give `https://b.example/v1/chat/completions`; `https://gw.example/openai/v1`
/// gives `/openai/v1/chat/completions`; `https://gw.example/proxy` gives
/// `/proxy/v1/chat/completions`. The request's query is kept, after the base URL's own query.
fn rebase(base: &BaseUrl, uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    let rest = path.strip_prefix('/').unwrap_or(path);
    let req: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        rest.split('/').collect()
    };
    let b = &base.segments;
    let overlap = (0..=b.len().min(req.len()))
        .rev()
        .find(|&k| {
            b[b.len() - k..]
                .iter()
                .zip(&req[..k])
                .all(|(x, y)| x.as_str() == *y)
        })
        .unwrap_or(0);
    let mut new_path = String::with_capacity(path.len() + 32);
    for s in b
        .iter()
        .map(String::as_str)
        .chain(req[overlap..].iter().copied())
    {
        new_path.push('/');
        new_path.push_str(s);
    }
    if new_path.is_empty() {
        new_path.push('/');
    }
    let query = match (&base.query, uri.query().filter(|q| !q.is_empty())) {
        (Some(b), Some(r)) => Some(format!("{b}&{r}")),
        (Some(b), None) => Some(b.clone()),
        (None, Some(r)) => Some(r.to_owned()),
        (None, None) => None,
    };
    if let Some(q) = query {
        new_path.push('?');
        new_path.push_str(&q);
    }
    let pq = PathAndQuery::try_from(new_path).ok()?;
    Uri::builder()
        .scheme(base.scheme.clone())
        .authority(base.authority.clone())
        .path_and_query(pq)
        .build()
        .ok()
}

/// `body` with the value of its top-level `model` string replaced by `model_json` (an encoded
/// JSON string). Every other byte is kept as it was: no re-serialisation, no reordering.
pub(crate) fn replace_model(body: &[u8], model_json: &[u8]) -> Result<Bytes, SkipReason> {
    let range = find_model(body)?;
    let mut out = BytesMut::with_capacity(body.len() - range.len() + model_json.len());
    out.extend_from_slice(&body[..range.start]);
    out.extend_from_slice(model_json);
    out.extend_from_slice(&body[range.end..]);
    Ok(out.freeze())
}

/// The byte range (quotes included) of the string value of the top-level `model` field.
fn find_model(body: &[u8]) -> Result<Range<usize>, SkipReason> {
    let mut found: Option<Range<usize>> = None;
    let mut duplicate = false;
    let mut not_string = false;
    top_level_fields(body, |key, value| {
        if key_is(key, "model") {
            duplicate |= found.is_some();
            not_string |= body.get(value.start) != Some(&b'"');
            found = Some(value);
        }
    })?;
    if duplicate {
        return Err(SkipReason::DuplicateModelField);
    }
    if not_string {
        return Err(SkipReason::NoModelField);
    }
    found.ok_or(SkipReason::NoModelField)
}

/// The byte range of the value of the top-level field `key` of the JSON object `body` (the
/// last one, should it appear twice).
pub(crate) fn top_level_value(body: &[u8], key: &str) -> Result<Option<Range<usize>>, SkipReason> {
    let mut found = None;
    top_level_fields(body, |k, value| {
        if key_is(k, key) {
            found = Some(value);
        }
    })?;
    Ok(found)
}

/// Hands over each top-level field of the JSON object `body`: its raw key (quotes included)
/// and the byte range of its value.
fn top_level_fields(
    body: &[u8],
    mut on_field: impl FnMut(&[u8], Range<usize>),
) -> Result<(), SkipReason> {
    // The scanner below only has to be right on valid JSON; serde checks validity first.
    serde_json::from_slice::<&serde_json::value::RawValue>(body)
        .map_err(|_| SkipReason::NotJson)?;
    let mut i = skip_ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return Err(SkipReason::NotJson);
    }
    i += 1;
    loop {
        i = skip_ws(body, i);
        match body.get(i) {
            Some(b'}') => break,
            Some(b',') => {
                i += 1;
                continue;
            }
            Some(b'"') => {}
            _ => return Err(SkipReason::NotJson),
        }
        let key_end = string_end(body, i).ok_or(SkipReason::NotJson)?;
        let key = &body[i..key_end];
        i = skip_ws(body, key_end);
        if body.get(i) != Some(&b':') {
            return Err(SkipReason::NotJson);
        }
        i = skip_ws(body, i + 1);
        let value_end = value_end(body, i).ok_or(SkipReason::NotJson)?;
        on_field(key, i..value_end);
        i = value_end;
    }
    Ok(())
}

/// Whether the raw JSON key `raw` (quotes included) is `key`.
fn key_is(raw: &[u8], key: &str) -> bool {
    if raw.len() == key.len() + 2 && &raw[1..raw.len() - 1] == key.as_bytes() {
        return true;
    }
    // An escaped key (`"mod\u0065l"`) names the same field once decoded.
    raw.contains(&b'\\') && serde_json::from_slice::<String>(raw).is_ok_and(|k| k == key)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index after the closing quote of the string starting at `start` (a `"`).
fn string_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match b.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The index after the value starting at `start`. Nested values are skipped iteratively, so
/// depth cannot exhaust the stack.
fn value_end(b: &[u8], start: usize) -> Option<usize> {
    match b.get(start)? {
        b'"' => string_end(b, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match b.get(i)? {
                    b'"' => {
                        i = string_end(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            // A number, `true`, `false` or `null`: up to the next delimiter.
            let mut i = start;
            while let Some(c) = b.get(i) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                i += 1;
            }
            (i > start).then_some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn base(url: &str) -> BaseUrl {
        parse_base("f", url).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rebased(b: &str, uri: &str) -> String {
        let uri: Uri = uri.parse().unwrap_or_else(|e| panic!("{e}"));
        rebase(&base(b), &uri)
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn base_url_joins_on_the_shared_segments() {
        let req = "http://127.0.0.1:9/v1/chat/completions";
        assert_eq!(
            rebased("https://backup.example/v1", req),
            "https://backup.example/v1/chat/completions"
        );
        assert_eq!(
            rebased("https://backup.example/v1/", req),
            "https://backup.example/v1/chat/completions"
        );
        assert_eq!(
            rebased("https://gw.example/openai/v1", req),
            "https://gw.example/openai/v1/chat/completions"
        );
        assert_eq!(
            rebased("https://gw.example/proxy", req),
            "https://gw.example/proxy/v1/chat/completions"
        );
        assert_eq!(
            rebased("https://backup.example", req),
            "https://backup.example/v1/chat/completions"
        );
        assert_eq!(
            rebased("http://10.0.0.1:8080/", "/v1/chat/completions?x=1"),
            "http://10.0.0.1:8080/v1/chat/completions?x=1"
        );
        assert_eq!(
            rebased(
                "https://az.example/openai?api-version=2024-06-01",
                "/chat?x=1"
            ),
            "https://az.example/openai/chat?api-version=2024-06-01&x=1"
        );
        assert_eq!(rebased("https://b.example/v1", "/"), "https://b.example/v1");
        assert_eq!(
            rebased("https://b.example/v1", "/v1/models/"),
            "https://b.example/v1/models/"
        );
    }

    fn model(body: &str, m: &str) -> Result<String, SkipReason> {
        let json = serde_json::to_string(m).unwrap_or_default();
        replace_model(body.as_bytes(), json.as_bytes())
            .map(|b| String::from_utf8(b.to_vec()).unwrap_or_default())
    }

    #[test]
    fn model_splice_keeps_every_other_byte() {
        let body = "{ \"messages\" : [{\"role\":\"user\",\"content\":\"say \\\"model\\\": 1\"}],\n  \"model\":\"gpt-4o\" , \"meta\":{\"model\":\"inner\"},\"stream\":true}";
        let out = model(body, "backup-model").unwrap_or_default();
        assert_eq!(
            out,
            body.replace("\"model\":\"gpt-4o\"", "\"model\":\"backup-model\"")
        );
        // The model is escaped as JSON.
        assert_eq!(
            model("{\"model\":\"a\"}", "we\"ird\\"),
            Ok("{\"model\":\"we\\\"ird\\\\\"}".to_owned())
        );
        // Escaped key, escaped value.
        assert_eq!(
            model("{\"mod\\u0065l\":\"a\\\"b\",\"n\":-1.5e3}", "m"),
            Ok("{\"mod\\u0065l\":\"m\",\"n\":-1.5e3}".to_owned())
        );
    }

    #[test]
    fn model_splice_refuses_what_it_cannot_do_exactly() {
        assert_eq!(model("not json", "m"), Err(SkipReason::NotJson));
        assert_eq!(model("[{\"model\":\"a\"}]", "m"), Err(SkipReason::NotJson));
        assert_eq!(model("{\"model\":\"a\"", "m"), Err(SkipReason::NotJson));
        assert_eq!(
            model("{\"prompt\":\"a\"}", "m"),
            Err(SkipReason::NoModelField)
        );
        assert_eq!(model("{\"model\":7}", "m"), Err(SkipReason::NoModelField));
        assert_eq!(
            model("{\"x\":{\"model\":\"a\"}}", "m"),
            Err(SkipReason::NoModelField)
        );
        assert_eq!(
            model("{\"model\":\"a\",\"model\":\"b\"}", "m"),
            Err(SkipReason::DuplicateModelField)
        );
        assert_eq!(model("", "m"), Err(SkipReason::NotJson));
        // Deep nesting is skipped without recursion.
        let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let deep = format!("{{\"x\":{nested},\"model\":\"a\"}}");
        let want = format!("{{\"x\":{nested},\"model\":\"m\"}}");
        assert!(model(&deep, "m") == Ok(want));
    }

    #[test]
    fn rewrite_applies_every_part() {
        let config = RouteConfig::new("backup")
            .base_url("https://backup.example/v1")
            .model("claude")
            .set_header("x-api-key", "k2")
            .remove_header("authorization")
            .approve_credentials();
        let route = Route::new("fallback.routes[0]", &config).unwrap_or_else(|e| panic!("{e}"));
        let body = "{\"model\":\"gpt-4o\",\"max_tokens\":64}";
        let mut req = Request::post("http://127.0.0.1:1/v1/chat/completions")
            .header("authorization", "Bearer k1")
            .header("host", "127.0.0.1:1")
            .header("content-length", body.len())
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(route.rewrite(&mut req), Ok(()));
        let want = "{\"model\":\"claude\",\"max_tokens\":64}";
        assert_eq!(req.uri(), "https://backup.example/v1/chat/completions");
        assert_eq!(req.headers()["host"], "backup.example");
        assert_eq!(
            req.headers()["content-length"],
            want.len().to_string().as_str()
        );
        assert!(req.headers().get("authorization").is_none());
        assert_eq!(req.headers()["x-api-key"], "k2");
        assert!(req.headers()["x-api-key"].is_sensitive());
        assert_eq!(req.body().to_bytes().as_deref(), Some(want.as_bytes()));
        assert!(!format!("{route:?}").contains("k2"));
    }

    #[test]
    fn a_body_that_cannot_be_rebuilt_skips_the_route() {
        let route =
            Route::new("r", &RouteConfig::new("b").model("m")).unwrap_or_else(|e| panic!("{e}"));
        let mut req = Request::new(http_body_util::Empty::<Bytes>::new());
        // Empty reads as "" (not JSON).
        assert_eq!(route.rewrite(&mut req), Err(SkipReason::NotJson));
    }
}

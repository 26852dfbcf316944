//! The scripted provider server.

use std::collections::HashMap;
use std::fmt;
use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::body::{MockBody, SseBody};
use super::reply::{Content, Reply, SEQ, prefill_of};
use crate::BoxError;

/// Which requests a script answers. See [`MockProvider::script`] for the matching order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ScriptKey {
    /// Requests whose JSON body has this `model` field.
    Model(String),
    /// Requests to this path (the query is ignored), e.g. `/v1/chat/completions`.
    Path(String),
    /// Every request no model or path script matched.
    Any,
}

impl ScriptKey {
    /// Requests whose JSON body has `"model": model`.
    pub fn model(model: impl Into<String>) -> Self {
        Self::Model(model.into())
    }

    /// Requests to `path` (without the query).
    pub fn path(path: impl Into<String>) -> Self {
        Self::Path(path.into())
    }
}

/// A request the mock received, for assertions.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RecordedRequest {
    /// The request method.
    pub method: Method,
    /// Path and query, e.g. `/v1/chat/completions?api-version=2024-10-21`.
    pub path: String,
    /// The request headers.
    pub headers: HeaderMap,
    /// The complete request body.
    pub body: Bytes,
    /// The `model` field of a JSON body, if it has one.
    pub model: Option<String>,
    /// The text of the last message of a chat request when that is an assistant message: the
    /// prefill a continuation request carries.
    pub prefill: Option<String>,
    /// When the request arrived, on the tokio clock (so it works under paused time).
    pub at: Instant,
}

/// A scripted model-API server on loopback, for tests.
///
/// A real HTTP/1.1 server (hyper) on `127.0.0.1` at a free port, running in the current tokio
/// runtime. It answers each request with the next [`Reply`] of the script that matches it and
/// records every request it receives. Dropping it closes the listening socket and every open
/// connection at once.
///
/// All waits (delayed heads, event delays) use `tokio::time`, and the server runs no timer of its
/// own, so tests under `#[tokio::test(start_paused = true)]` can assert exact times.
pub struct MockProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

struct Shared {
    /// Taken out (and so closed) when the mock is dropped.
    listener: Mutex<Option<TcpListener>>,
    state: Mutex<State>,
    connections: Mutex<Vec<Connection>>,
}

#[derive(Default)]
struct State {
    scripts: HashMap<ScriptKey, Script>,
    requests: Vec<RecordedRequest>,
}

struct Script {
    replies: Vec<Reply>,
    next: usize,
}

struct Connection {
    task: AbortHandle,
    /// A second handle on the connection's socket; weak so that the socket closes as soon as its
    /// task ends.
    socket: Weak<socket2::Socket>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not turn every later assertion into a poison panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MockProvider {
    /// Starts a mock provider on `127.0.0.1` at a free port.
    ///
    /// Must be called within a tokio runtime (the server runs as tasks of that runtime).
    pub async fn start() -> std::io::Result<MockProvider> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            listener: Mutex::new(Some(listener)),
            state: Mutex::new(State::default()),
            connections: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(Arc::clone(&shared))).abort_handle();
        Ok(MockProvider {
            addr,
            shared,
            accept,
        })
    }

    /// The base URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the script for `key`: the replies are served in order, and after the last one the
    /// last reply repeats forever. Calling it again for the same key replaces that script and
    /// starts it from its first reply; an empty script removes it.
    ///
    /// An incoming request is matched by the `model` field of its JSON body first, then by its
    /// path, then by [`ScriptKey::Any`]. A request nothing matches is answered with
    /// `Reply::openai_chat(model, "ok")` (`model` from its body, or `"mock-model"`).
    pub fn script(&self, key: ScriptKey, replies: impl IntoIterator<Item = Reply>) {
        let replies: Vec<Reply> = replies.into_iter().collect();
        let mut state = lock(&self.shared.state);
        if replies.is_empty() {
            state.scripts.remove(&key);
        } else {
            state.scripts.insert(key, Script { replies, next: 0 });
        }
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.state).requests.clone()
    }

    /// How many requests were received so far.
    pub fn request_count(&self) -> usize {
        lock(&self.shared.state).requests.len()
    }
}

impl fmt::Debug for MockProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockProvider")
            .field("addr", &self.addr)
            .field("request_count", &self.request_count())
            .finish()
    }
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        // Closing the listener here, not in the aborted task, makes a connection attempt right
        // after the drop fail instead of landing in the backlog.
        drop(lock(&self.shared.listener).take());
        self.accept.abort();
        for conn in lock(&self.shared.connections).drain(..) {
            if let Some(socket) = conn.socket.upgrade() {
                // Immediate for the peer, even before the runtime gets to the aborted task.
                let _ = socket.shutdown(Shutdown::Both);
            }
            conn.task.abort();
        }
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let accepted = std::future::poll_fn(|cx| match lock(&shared.listener).as_ref() {
            Some(listener) => listener.poll_accept(cx).map(Some),
            None => Poll::Ready(None),
        })
        .await;
        match accepted {
            None => return,
            Some(Ok((stream, _))) => spawn_connection(&shared, stream),
            // Out of descriptors or an aborted handshake: try again shortly.
            Some(Err(_)) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let socket = match socket2::SockRef::from(&stream).try_clone() {
        Ok(socket) => Arc::new(socket),
        Err(_) => return,
    };
    let weak = Arc::downgrade(&socket);
    let state = Arc::clone(shared);
    let task = tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            handle(Arc::clone(&state), Arc::clone(&socket), req)
        });
        // No timer: hyper's header-read timeout stays off, so nothing fires on its own under
        // paused time.
        let _ = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
    .abort_handle();
    let mut conns = lock(&shared.connections);
    conns.retain(|c| c.socket.strong_count() > 0);
    conns.push(Connection { task, socket: weak });
}

async fn handle(
    shared: Arc<Shared>,
    socket: Arc<socket2::Socket>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, BoxError> {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let model = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("model")?.as_str().map(str::to_owned));
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());

    let (seq, reply) = {
        let mut state = lock(&shared.state);
        let reply = pick(&mut state.scripts, model.as_deref(), parts.uri.path()).for_request(&body);
        state.requests.push(RecordedRequest {
            method: parts.method,
            path,
            headers: parts.headers,
            prefill: prefill_of(&body),
            body,
            model,
            at,
        });
        (state.requests.len(), reply)
    };

    if let Some(delay) = reply.head_delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(problem) = &reply.invalid {
        return Ok(invalid_reply(problem));
    }
    let seq = seq.to_string();
    let body = match reply.content {
        Content::Never => std::future::pending().await,
        Content::Reset => {
            // Linger zero turns the close into a TCP RST; the close happens when hyper drops the
            // connection on this error and the task ends.
            let _ = socket.set_linger(Some(Duration::ZERO));
            return Err("mock provider reset the connection".into());
        }
        Content::Full { body, templated } => {
            let body = if templated {
                body.replace(SEQ, &seq)
            } else {
                body
            };
            MockBody::Full(Some(Bytes::from(body)))
        }
        Content::Sse(sse) => {
            let events = if sse.templated {
                sse.events.iter().map(|e| e.replace(SEQ, &seq)).collect()
            } else {
                sse.events
            };
            MockBody::Sse(SseBody::new(events, sse.delay, sse.end))
        }
        // Worked out from the request above.
        Content::Continuation(_) => MockBody::Full(None),
    };
    let mut response = Response::new(body);
    *response.status_mut() = reply.status;
    *response.headers_mut() = reply.headers;
    if let Some(name) = reply.request_id {
        // A request id set with `Reply::header` wins over the counter.
        if !response.headers().contains_key(&name) {
            if let Ok(value) = HeaderValue::from_str(&format!("req_mock_{seq}")) {
                response.headers_mut().insert(name, value);
            }
        }
    }
    Ok(response)
}

/// The next reply for a request: model script, then path script, then `Any`, then the default.
fn pick(scripts: &mut HashMap<ScriptKey, Script>, model: Option<&str>, path: &str) -> Reply {
    let keys = [
        model.map(ScriptKey::model),
        Some(ScriptKey::path(path)),
        Some(ScriptKey::Any),
    ];
    for key in keys.into_iter().flatten() {
        if let Some(script) = scripts.get_mut(&key) {
            let last = script.replies.len().saturating_sub(1);
            if let Some(reply) = script.replies.get(script.next.min(last)) {
                script.next = script.next.saturating_add(1);
                return reply.clone();
            }
        }
    }
    Reply::openai_chat(model.unwrap_or("mock-model"), "ok")
}

fn invalid_reply(problem: &str) -> Response<MockBody> {
    let mut response = Response::new(MockBody::Full(Some(Bytes::from(format!(
        "MockProvider: invalid scripted reply: {problem}"
    )))));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    headers.insert("x-mock-error", HeaderValue::from_static("invalid-reply"));
    response
}

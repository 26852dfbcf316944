//! Pieces every bench binary shares: a counting global allocator, the request, the bare service.

#![allow(dead_code)] // each bench binary uses a different part of this file

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;

/// Counts heap allocations (`alloc`, `alloc_zeroed` and growing `realloc`s) and bytes requested.
pub struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to the system allocator unchanged; the counters are atomics.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Allocations and bytes requested so far.
pub fn allocations() -> (u64, u64) {
    (
        ALLOCATIONS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}

/// True under `cargo bench` (which passes `--bench`); false under `cargo test --benches`, where
/// each bench binary only checks that it runs.
pub fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A small OpenAI-style chat request, as an application would send it.
pub const CHAT_REQUEST: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello."}],"max_tokens":64}"#;

/// A small non-streamed chat completion.
pub const CHAT_RESPONSE: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello."},"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":2,"total_tokens":23}}"#;

/// The request every bench sends.
pub fn chat_request() -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from_static(CHAT_REQUEST)));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("https://api.openai.com/v1/chat/completions");
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    req
}

/// The bare service: a ready 200 with a small JSON body.
pub fn ok_response() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(CHAT_RESPONSE)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The bare transport: `tower::service_fn` returning [`ok_response`] at once.
pub type BareFn = fn(Request<Full<Bytes>>) -> Ready<Result<Response<Full<Bytes>>, Infallible>>;

/// The bare transport as a `tower::service_fn`.
pub fn bare() -> tower::util::ServiceFn<BareFn> {
    tower::service_fn((|_req| ready(Ok(ok_response()))) as BareFn)
}

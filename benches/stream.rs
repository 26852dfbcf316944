//! Stream throughput: a 10 MB server-sent-event stream of ~100-byte OpenAI-style delta events,
//! read to the end through `StreamGuardLayer` and straight from the transport.
//!
//! Two chunkings: one event per chunk (a provider flushing every token — the guard's worst
//! case) and 16 KiB chunks (events coalesced by the network). The in-memory "raw body" hands
//! over prepared chunks and does no work at all, so it measures the guard's own cost; the
//! loopback pair sends the same stream over HTTP/1.1 on 127.0.0.1 (hyper server, hyper-util
//! client, one thread for both), which is what a caller's raw body really costs.
//!
//! ```text
//! cargo bench --bench stream
//! ```

mod common;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_llm_resilience::Policy;
use tower_llm_resilience::stream_guard::StreamGuardLayer;

use common::{CountingAlloc, chat_request};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const TOTAL: usize = 10 * 1024 * 1024;

/// One ~100-byte delta event.
fn delta_event(i: usize) -> Vec<u8> {
    // Pad the content so each event is exactly 100 bytes.
    let head = format!(
        "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}",
        i % 10
    );
    let tail = "\"}}]}\n\n";
    let pad = 100usize.saturating_sub(head.len() + tail.len());
    let mut e = head.into_bytes();
    e.extend(std::iter::repeat_n(b'x', pad));
    e.extend_from_slice(tail.as_bytes());
    e
}

/// The whole stream: role delta, content deltas up to 10 MB, finish reason, `[DONE]`.
fn sse_stream() -> Vec<u8> {
    let mut s = Vec::with_capacity(TOTAL + 512);
    s.extend_from_slice(b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n");
    let mut i = 0;
    while s.len() < TOTAL - 200 {
        s.extend_from_slice(&delta_event(i));
        i += 1;
    }
    s.extend_from_slice(b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n");
    s.extend_from_slice(b"data: [DONE]\n\n");
    s
}

/// Splits `stream` into events (`\n\n`-terminated) or fixed-size chunks.
fn chunks(stream: &Bytes, per_event: bool) -> Arc<[Bytes]> {
    let mut out = Vec::new();
    if per_event {
        let mut start = 0;
        for i in 1..stream.len() {
            if stream[i] == b'\n' && stream[i - 1] == b'\n' {
                out.push(stream.slice(start..=i));
                start = i + 1;
            }
        }
        if start < stream.len() {
            out.push(stream.slice(start..));
        }
    } else {
        let mut start = 0;
        while start < stream.len() {
            let end = (start + 16 * 1024).min(stream.len());
            out.push(stream.slice(start..end));
            start = end;
        }
    }
    out.into()
}

/// A body yielding prepared chunks, as a transport would (no copy, no allocation per chunk).
struct ChunkBody {
    chunks: Arc<[Bytes]>,
    next: usize,
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let i = self.next;
        match self.chunks.get(i) {
            Some(c) => {
                let c = c.clone();
                self.next += 1;
                Poll::Ready(Some(Ok(Frame::data(c))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.chunks.len()
    }
}

/// The transport: answers every request with the event stream.
fn transport(
    chunks: Arc<[Bytes]>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<ChunkBody>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<ChunkBody>, Infallible>>,
> + Clone {
    tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let mut resp = Response::new(ChunkBody {
            chunks: chunks.clone(),
            next: 0,
        });
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        std::future::ready(Ok(resp))
    })
}

/// Sends one request and reads the whole stream; returns the bytes read.
async fn read_all<S, RB>(svc: &mut S) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>>,
    S::Error: std::fmt::Debug,
    RB: http_body::Body<Data = Bytes> + Unpin,
    RB::Error: std::fmt::Debug,
{
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(chat_request())
        .await
        .expect("a stream");
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("no error in the stream").into_data() {
            n += data.len();
        }
    }
    n
}

/// Serves the event stream over HTTP/1.1 on loopback; returns the request URI.
async fn loopback_server(chunks: Arc<[Bytes]>) -> http::Uri {
    use hyper_util::rt::TokioIo;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let chunks = chunks.clone();
            let service =
                hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let mut resp = Response::new(ChunkBody {
                        chunks: chunks.clone(),
                        next: 0,
                    });
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/event-stream"),
                    );
                    std::future::ready(Ok::<_, Infallible>(resp))
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}/v1/chat/completions")
        .parse()
        .expect("a valid URI")
}

/// The hyper-util client, with the request pointed at the loopback server.
type LoopbackClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn loopback_client() -> LoopbackClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// Sends one request to `uri` and reads the whole stream; returns the bytes read.
async fn read_all_at<S, RB>(svc: &mut S, uri: &http::Uri) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<RB>>,
    S::Error: std::fmt::Debug,
    RB: http_body::Body<Data = Bytes> + Unpin,
    RB::Error: std::fmt::Debug,
{
    let mut req = chat_request();
    *req.uri_mut() = uri.clone();
    let resp = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("a stream");
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("no error in the stream").into_data() {
            n += data.len();
        }
    }
    n
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let full = common::full_run();
    let mut c = Criterion::default()
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(10)
        .configure_from_args();
    let stream = Bytes::from(sse_stream());
    let policy = Policy::interactive();
    let mut table = Vec::new();

    for (label, per_event) in [
        ("in memory, one event per chunk", true),
        ("in memory, 16 KiB chunks", false),
    ] {
        let chunks = chunks(&stream, per_event);
        let n_chunks = chunks.len();
        let raw = transport(chunks.clone());
        let guarded = {
            let _guard = rt.enter();
            StreamGuardLayer::from_policy(&policy)
                .expect("policy")
                .layer(transport(chunks.clone()))
        };

        let mut group = c.benchmark_group(format!("stream 10 MB, {label}"));
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_function("raw body", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut svc = raw.clone();
                    let start = Instant::now();
                    for _ in 0..iters {
                        assert_eq!(read_all(&mut svc).await, stream.len());
                    }
                    start.elapsed()
                })
            })
        });
        group.bench_function("StreamGuardLayer", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut svc = guarded.clone();
                    let start = Instant::now();
                    for _ in 0..iters {
                        assert_eq!(read_all(&mut svc).await, stream.len());
                    }
                    start.elapsed()
                })
            })
        });
        group.finish();

        // Own pass: MB/s and allocations per stream, best of a few runs.
        let runs = if full { 10 } else { 1 };
        let pass = |guard: bool| {
            rt.block_on(async {
                let mut best = f64::INFINITY;
                let mut allocs = 0;
                for _ in 0..runs {
                    let (a0, _) = common::allocations();
                    let start = Instant::now();
                    let n = if guard {
                        read_all(&mut guarded.clone()).await
                    } else {
                        read_all(&mut raw.clone()).await
                    };
                    let t = start.elapsed().as_secs_f64();
                    assert_eq!(n, stream.len());
                    allocs = common::allocations().0 - a0;
                    best = best.min(t);
                }
                (stream.len() as f64 / best / 1e6, allocs)
            })
        };
        let (raw_mbs, raw_allocs) = pass(false);
        let (guard_mbs, guard_allocs) = pass(true);
        table.push((
            label,
            n_chunks,
            raw_mbs,
            raw_allocs,
            guard_mbs,
            guard_allocs,
        ));
    }

    for (label, per_event) in [("one event per chunk", true), ("16 KiB chunks", false)] {
        let chunks = chunks(&stream, per_event);
        let uri = rt.block_on(loopback_server(chunks.clone()));
        let raw = loopback_client();
        let guarded = {
            let _guard = rt.enter();
            StreamGuardLayer::from_policy(&policy)
                .expect("policy")
                .layer(loopback_client())
        };
        let mut group = c.benchmark_group(format!("loopback HTTP/1.1 stream 10 MB, {label}"));
        group.throughput(Throughput::Bytes(stream.len() as u64));
        group.bench_function("raw body", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut svc = raw.clone();
                    let start = Instant::now();
                    for _ in 0..iters {
                        assert_eq!(read_all_at(&mut svc, &uri).await, stream.len());
                    }
                    start.elapsed()
                })
            })
        });
        group.bench_function("StreamGuardLayer", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut svc = guarded.clone();
                    let start = Instant::now();
                    for _ in 0..iters {
                        assert_eq!(read_all_at(&mut svc, &uri).await, stream.len());
                    }
                    start.elapsed()
                })
            })
        });
        group.finish();
        let runs = if full { 5 } else { 1 };
        let pass = |guard: bool| {
            rt.block_on(async {
                let mut best = f64::INFINITY;
                let mut allocs = 0;
                for _ in 0..runs {
                    let (a0, _) = common::allocations();
                    let start = Instant::now();
                    let n = if guard {
                        read_all_at(&mut guarded.clone(), &uri).await
                    } else {
                        read_all_at(&mut raw.clone(), &uri).await
                    };
                    let t = start.elapsed().as_secs_f64();
                    assert_eq!(n, stream.len());
                    allocs = common::allocations().0 - a0;
                    best = best.min(t);
                }
                (stream.len() as f64 / best / 1e6, allocs)
            })
        };
        let (raw_mbs, raw_allocs) = pass(false);
        let (guard_mbs, guard_allocs) = pass(true);
        table.push((
            if per_event {
                "loopback HTTP/1.1, one event per chunk"
            } else {
                "loopback HTTP/1.1, 16 KiB chunks"
            },
            chunks.len(),
            raw_mbs,
            raw_allocs,
            guard_mbs,
            guard_allocs,
        ));
    }

    c.final_summary();
    println!();
    println!(
        "10 MB event stream ({} bytes), best of the own passes:",
        stream.len()
    );
    println!();
    println!(
        "| chunking | chunks | raw MB/s | guarded MB/s | guarded / raw | raw allocations | guarded allocations |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, n, raw, ra, guard, ga) in table {
        println!(
            "| {label} | {n} | {raw:.0} | {guard:.0} | {:.1} % | {ra} | {ga} |",
            guard / raw * 100.0
        );
    }
}

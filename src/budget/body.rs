//! The response body that settles a spend reservation when it ends or is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use serde_json::Value;

use super::spend::{End, Ticket};
use crate::RouteName;
use crate::attempt_log::Usage;
use crate::sse::event::{Scanner, UsagePart, usage_of};

pin_project! {
    /// Passes the body through untouched, reads the provider's `usage` on the way (within the
    /// peek bound), and settles the reservation at the end — or, when the body is dropped or
    /// fails first, as the charge rule says for a partial answer.
    pub(crate) struct SpendBody<B>
    where
        B: http_body::Body,
    {
        #[pin]
        inner: B,
        ticket: Option<Arc<Ticket>>,
        scan: UsageScan,
        success: bool,
        route: Option<RouteName>,
    }

    impl<B> PinnedDrop for SpendBody<B>
    where
        B: http_body::Body,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let complete = this.inner.is_end_stream();
            settle(this.ticket, this.scan, *this.success, complete, this.route);
        }
    }
}

impl<B: http_body::Body> SpendBody<B> {
    pub(crate) fn new(
        inner: B,
        ticket: Arc<Ticket>,
        headers: &http::HeaderMap,
        success: bool,
        route: Option<RouteName>,
        limit: usize,
    ) -> Self {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let kind = if !success {
            Kind::Skip
        } else if content_type.starts_with("text/event-stream") {
            Kind::Sse
        } else if content_type.starts_with("application/json") || content_type.contains("+json") {
            Kind::Json
        } else {
            Kind::Skip
        };
        Self {
            inner,
            ticket: Some(ticket),
            scan: UsageScan::new(kind, limit),
            success,
            route,
        }
    }
}

fn settle(
    ticket: &mut Option<Arc<Ticket>>,
    scan: &mut UsageScan,
    success: bool,
    complete: bool,
    route: &Option<RouteName>,
) {
    if let Some(ticket) = ticket.take() {
        let usage = if complete {
            scan.finish()
        } else {
            scan.so_far()
        };
        ticket.settle(End::Response {
            success,
            complete,
            usage,
            route: route.clone(),
        });
    }
}

impl<B> http_body::Body for SpendBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.scan.feed(data.chunk());
                }
            }
            Poll::Ready(Some(Err(_))) => {
                settle(this.ticket, this.scan, *this.success, false, this.route)
            }
            Poll::Ready(None) => settle(this.ticket, this.scan, *this.success, true, this.route),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Skip,
    Json,
    Sse,
}

/// Finds `usage` in a JSON answer (held up to `limit` bytes) or in the events of a stream
/// (events longer than `limit` are skipped), with the same provider knowledge as the stream
/// guard.
#[derive(Debug)]
struct UsageScan {
    kind: Kind,
    limit: usize,
    buf: Vec<u8>,
    events: Option<Scanner>,
    usage: UsagePart,
}

impl UsageScan {
    fn new(kind: Kind, limit: usize) -> Self {
        Self {
            kind,
            limit,
            buf: Vec::new(),
            events: (kind == Kind::Sse).then(|| Scanner::with_limit(limit)),
            usage: UsagePart::default(),
        }
    }

    fn feed(&mut self, data: &[u8]) {
        match self.kind {
            Kind::Skip => {}
            Kind::Json => {
                if self.buf.len() + data.len() > self.limit {
                    // Too large to hold: its usage stays unknown.
                    self.kind = Kind::Skip;
                    self.buf = Vec::new();
                } else {
                    self.buf.extend_from_slice(data);
                }
            }
            Kind::Sse => {
                if let Some(events) = self.events.as_mut() {
                    let usage = &mut self.usage;
                    events.feed(data, &mut |ev| {
                        if let Some(u) = ev.usage {
                            usage.merge(u);
                        }
                    });
                }
            }
        }
    }

    /// The usage reported so far (a stream's, while it is still running).
    fn so_far(&self) -> Option<Usage> {
        self.usage.usage()
    }

    fn finish(&mut self) -> Option<Usage> {
        match self.kind {
            Kind::Json => {
                let v = serde_json::from_slice::<Value>(&self.buf).ok()?;
                usage_of(&v)?.usage()
            }
            Kind::Sse => {
                if let Some(events) = self.events.as_mut() {
                    let usage = &mut self.usage;
                    events.finish(&mut |ev| {
                        if let Some(u) = ev.usage {
                            usage.merge(u);
                        }
                    });
                }
                self.usage.usage()
            }
            Kind::Skip => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(kind: Kind, limit: usize, chunks: &[&str]) -> Option<Usage> {
        let mut s = UsageScan::new(kind, limit);
        for c in chunks {
            s.feed(c.as_bytes());
        }
        s.finish()
    }

    #[test]
    fn json_usage_of_each_api() {
        let openai = r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
        assert_eq!(
            scan(Kind::Json, 1024, &[&openai[..20], &openai[20..]]),
            Some(Usage::new(12, 7))
        );
        let anthropic = r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}"#;
        assert_eq!(scan(Kind::Json, 1024, &[anthropic]), Some(Usage::new(3, 4)));
        let gemini = r#"{"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":6,"thoughtsTokenCount":1}}"#;
        assert_eq!(scan(Kind::Json, 1024, &[gemini]), Some(Usage::new(5, 7)));
        // Beyond the peek bound, or not JSON: unknown.
        assert_eq!(scan(Kind::Json, 10, &[openai]), None);
        assert_eq!(scan(Kind::Json, 1024, &["{\"usage\":"]), None);
        assert_eq!(scan(Kind::Json, 1024, &[r#"{"usage":"lots"}"#]), None);
    }

    #[test]
    fn stream_usage_of_each_api() {
        let openai = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
                      data: [DONE]\n\n";
        let (a, b) = openai.split_at(70);
        assert_eq!(scan(Kind::Sse, 1024, &[a, b]), Some(Usage::new(9, 2)));
        let anthropic = "event: message_start\n\
            data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
            event: message_delta\n\
            data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
            event: message_stop\n\
            data: {\"type\":\"message_stop\"}";
        assert_eq!(
            scan(Kind::Sse, 1024, &[anthropic]),
            Some(Usage::new(25, 15))
        );
        // An event longer than the bound is skipped, later events still count.
        let long = format!(
            "data: {{\"usage\":{{\"prompt_tokens\":1,\"pad\":\"{}\"}}}}\n\ndata: {{\"usage\":{{\"output_tokens\":3}}}}\n",
            "x".repeat(200)
        );
        assert_eq!(scan(Kind::Sse, 100, &[&long]), Some(Usage::new(0, 3)));
    }
}

//! The body that ends a request when the answer's body ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;

use super::Noted;
use super::finish::Ended;
use crate::attempt_log::{AttemptLog, Usage};
use crate::error::Error;
use crate::sse::event::counts;

pin_project! {
    /// Passes the answer's body through untouched and ends the request once it has ended,
    /// failed or been dropped — after the bodies inside it (the stream guard's record, a spend
    /// settlement) have ended theirs.
    pub(crate) struct Watched<B> {
        #[pin]
        inner: Option<B>,
        end: Option<(AttemptLog, Noted)>,
        json: Option<JsonUsage>,
    }

    impl<B> PinnedDrop for Watched<B> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            // The inner bodies finish their records first.
            this.inner.set(None);
            finish(this.end, this.json);
        }
    }
}

impl<B> Watched<B> {
    /// Watches `inner` for the request of `log`. `json_limit`: read a JSON answer's `usage`
    /// (held up to that many bytes), when nothing else reports it.
    pub(crate) fn new(inner: B, log: AttemptLog, noted: Noted, json_limit: Option<usize>) -> Self
    where
        B: http_body::Body,
    {
        // Sized once for an answer that says how long it is.
        let expected = inner.size_hint().exact().map_or(0, |n| n as usize);
        Self {
            json: json_limit.map(|limit| JsonUsage::new(limit, expected)),
            inner: Some(inner),
            end: Some((log, noted)),
        }
    }
}

fn finish(end: &mut Option<(AttemptLog, Noted)>, json: &mut Option<JsonUsage>) {
    if let Some((log, noted)) = end.take() {
        let json_usage = json.take().and_then(JsonUsage::finish);
        noted.finish(
            &log,
            Ended {
                error_kind: None,
                json_usage,
            },
        );
    }
}

impl<B> http_body::Body for Watched<B>
where
    B: http_body::Body<Data = Bytes, Error = Error>,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let polled = inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(json), Some(data)) = (this.json.as_mut(), frame.data_ref()) {
                    json.feed(data.chunk());
                }
            }
            Poll::Ready(Some(Err(_))) => {
                // A failed body says no more: its usage is unknown.
                *this.json = None;
                finish(this.end, this.json);
            }
            Poll::Ready(None) => finish(this.end, this.json),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// A JSON answer held up to a bound, for its `usage`.
struct JsonUsage {
    limit: usize,
    buf: Vec<u8>,
    over: bool,
}

impl JsonUsage {
    fn new(limit: usize, expected: usize) -> Self {
        Self {
            limit,
            buf: Vec::with_capacity(expected.min(limit)),
            over: false,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        if self.over {
            return;
        }
        if self.buf.len() + data.len() > self.limit {
            // Too large to hold: its usage stays unknown.
            self.over = true;
            self.buf = Vec::new();
        } else {
            self.buf.extend_from_slice(data);
        }
    }

    /// The counts of the first `usage` (or Gemini's `usageMetadata`) object of the answer.
    /// Only that object is parsed: the answer around it is never built into a value.
    fn finish(self) -> Option<Usage> {
        if self.over {
            return None;
        }
        [&b"\"usage\""[..], b"\"usageMetadata\""]
            .into_iter()
            .find_map(|key| {
                memchr::memmem::find_iter(&self.buf, key).find_map(|at| {
                    // A key is a string followed by a colon; the object is its value.
                    let rest = self.buf.get(at + key.len()..)?.trim_ascii_start();
                    let rest = rest.strip_prefix(b":")?.trim_ascii_start();
                    if !rest.starts_with(b"{") {
                        return None;
                    }
                    let mut values =
                        serde_json::Deserializer::from_slice(rest).into_iter::<serde_json::Value>();
                    counts(&values.next()?.ok()?)
                })
            })?
            .usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(chunks: &[&str]) -> Option<Usage> {
        let mut j = JsonUsage::new(1024, 0);
        for c in chunks {
            j.feed(c.as_bytes());
        }
        j.finish()
    }

    #[test]
    fn the_usage_object_of_each_api() {
        let openai = r#"{"choices":[{"message":{"content":"usage"}}],"usage" : {"prompt_tokens":12,"completion_tokens":7}}"#;
        assert_eq!(
            usage(&[&openai[..30], &openai[30..]]),
            Some(Usage::new(12, 7))
        );
        let anthropic = r#"{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}"#;
        assert_eq!(usage(&[anthropic]), Some(Usage::new(3, 4)));
        let gemini = r#"{"usageMetadata":{"promptTokenCount":5,"candidatesTokenCount":6,"thoughtsTokenCount":1}}"#;
        assert_eq!(usage(&[gemini]), Some(Usage::new(5, 7)));
        // No usage, a usage that is not an object, or an answer too large to hold.
        assert_eq!(usage(&[r#"{"choices":[]}"#]), None);
        assert_eq!(usage(&[r#"{"usage":"lots"}"#]), None);
        let mut small = JsonUsage::new(10, 0);
        small.feed(openai.as_bytes());
        assert_eq!(small.finish(), None);
    }
}

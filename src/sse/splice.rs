//! Continuing a stream in the caller's wire format: what the caller was handed of a stream
//! (its text, and where its events stand), and a continuation's events rewritten to follow it.
//!
//! Only used when stream continuation is on, so it may parse every event: the text of a delta
//! is in a nested string (OpenAI `choices[].delta.content`, Anthropic `content_block_delta`
//! `delta.text`), which the guard's scanner never reads.

use bytes::{BufMut, BytesMut};
use serde_json::Value;

use super::Frame;
use super::event::{EventKind, SseEvent};

/// The wire formats a stream can be continued in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// OpenAI-compatible chat chunks (`data: {"choices":[...]}`, then `data: [DONE]`).
    OpenAi,
    /// Anthropic Messages events (`message_start`, `content_block_*`, `message_stop`).
    Anthropic,
}

/// Why a stream cannot be continued, in a few words (never content).
pub(crate) type NotContinuable = &'static str;

/// What the caller has been handed of a stream, as far as a continuation needs it.
#[derive(Debug, Default)]
pub(crate) struct Transcript {
    wire: Option<Wire>,
    text: String,
    /// The most text kept; a longer answer cannot be continued.
    limit: usize,
    blocked: Option<NotContinuable>,
    /// OpenAI: the chunks' id and the choice's index.
    id: Option<String>,
    choice: Option<u64>,
    /// Anthropic: the highest content-block index seen, and the text block still open.
    last_block: Option<u64>,
    open_block: Option<u64>,
    /// A finish reason or the terminal marker reached the caller: the answer had ended.
    ended: bool,
}

fn object_type(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

fn index_of(v: &Value) -> u64 {
    v.get("index").and_then(Value::as_u64).unwrap_or(0)
}

/// Whether a value carries something (not `null`, not an empty string).
fn present(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

impl Transcript {
    /// A transcript keeping at most `limit` bytes of text.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// The answer's text so far.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Whether the stream can be continued, and in which wire format.
    pub(crate) fn continuable(&self) -> Result<Wire, NotContinuable> {
        if let Some(why) = self.blocked {
            return Err(why);
        }
        if self.ended {
            return Err("the answer had ended");
        }
        match self.wire {
            None => Err("no answer in a wire format that can be continued"),
            Some(_) if self.text.is_empty() => Err("no text to continue"),
            Some(w) => Ok(w),
        }
    }

    fn block(&mut self, why: NotContinuable) {
        self.blocked = Some(why);
        // The text is of no use any more.
        self.text = String::new();
    }

    fn wire_is(&mut self, wire: Wire) -> bool {
        match self.wire {
            None => {
                self.wire = Some(wire);
                true
            }
            Some(w) if w == wire => true,
            Some(_) => {
                self.block("events of two wire formats");
                false
            }
        }
    }

    fn push(&mut self, text: &str) {
        if self.text.len().saturating_add(text.len()) > self.limit {
            self.block("the answer is longer than `max_buffer`");
        } else {
            self.text.push_str(text);
        }
    }

    /// Takes note of an event the caller was handed.
    pub(crate) fn observe(&mut self, frame: Frame<'_>, ev: &SseEvent) {
        if self.blocked.is_some() {
            return;
        }
        match ev.kind {
            EventKind::Comment | EventKind::KeepAlive => return,
            // A piece of the answer the text would lack.
            EventKind::Malformed => return self.block("a malformed event"),
            EventKind::Content | EventKind::Other => {}
        }
        if ev.terminal || ev.finish.is_some() {
            self.ended = true;
        }
        let Frame::Event { name, data, .. } = frame else {
            return;
        };
        let data = data.trim_ascii();
        if ev.error.is_some() || data == b"[DONE]" {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(data) else {
            if ev.kind == EventKind::Content {
                self.block("a content event that is not JSON");
            }
            return;
        };
        let name = match name.trim_ascii() {
            b"" | b"message" => object_type(&v).unwrap_or("").as_bytes(),
            n => n,
        };
        match name {
            b"" if v.get("choices").is_some() => self.openai_chunk(&v),
            b"message_start" => {
                self.wire_is(Wire::Anthropic);
            }
            b"content_block_start" if self.wire_is(Wire::Anthropic) => {
                let i = index_of(&v);
                self.last_block = Some(self.last_block.map_or(i, |l| l.max(i)));
                let text = v
                    .get("content_block")
                    .and_then(object_type)
                    .is_some_and(|t| t == "text");
                if text {
                    self.open_block = Some(i);
                } else {
                    self.block("a content block that is not text");
                }
            }
            b"content_block_delta" if self.wire_is(Wire::Anthropic) => {
                let delta = v.get("delta");
                let text = delta
                    .filter(|d| object_type(d) == Some("text_delta"))
                    .and_then(|d| d.get("text"))
                    .and_then(Value::as_str);
                match text {
                    Some(t) if self.open_block == Some(index_of(&v)) => self.push(t),
                    Some(_) => self.block("a delta outside the open text block"),
                    None => self.block("a delta that is not text"),
                }
            }
            b"content_block_stop" if self.open_block == Some(index_of(&v)) => {
                self.open_block = None;
            }
            _ if ev.kind == EventKind::Content => {
                self.block("content of an API without prefill continuation");
            }
            _ => {}
        }
    }

    fn openai_chunk(&mut self, v: &Value) {
        if !self.wire_is(Wire::OpenAi) {
            return;
        }
        if self.id.is_none() {
            self.id = v.get("id").and_then(Value::as_str).map(str::to_owned);
        }
        let Some(choices) = v.get("choices").and_then(Value::as_array) else {
            return;
        };
        if choices.len() > 1 {
            return self.block("several choices");
        }
        let Some(choice) = choices.first() else {
            return;
        };
        let index = index_of(choice);
        match self.choice {
            None => self.choice = Some(index),
            Some(i) if i != index => return self.block("several choices"),
            Some(_) => {}
        }
        let Some(delta) = choice.get("delta") else {
            return;
        };
        // A prefill continues text; it cannot continue a tool call, reasoning or a refusal.
        let other = [
            "tool_calls",
            "function_call",
            "reasoning_content",
            "reasoning",
            "refusal",
        ]
        .iter()
        .any(|k| present(delta.get(*k)));
        if other {
            return self.block("a tool call, reasoning or refusal in the answer");
        }
        if let Some(t) = delta.get("content").and_then(Value::as_str) {
            self.push(t);
        }
    }
}

/// A continuation's events, rewritten to follow the caller's stream: no second role chunk or
/// `message_start`, the caller's chunk id and choice index, Anthropic content-block indices
/// going on from the caller's, then the continuation's finish reason, usage and terminal
/// marker.
#[derive(Debug)]
pub(crate) struct Splicer {
    wire: Wire,
    id: Option<String>,
    choice: u64,
    /// Anthropic: the continuation's block `k` is the caller's block `base + k`; with `merge`
    /// its block 0 goes on in the text block the caller has open (its start is dropped).
    base: u64,
    merge: bool,
    /// Whitespace left out of the prefill, dropped from the start of the continuation's text.
    skip: String,
    finish: bool,
    terminal: bool,
}

impl Splicer {
    /// A splicer following `t`; `skip` is the whitespace the prefill left out.
    pub(crate) fn new(t: &Transcript, skip: String) -> Option<Self> {
        let wire = t.wire?;
        let (base, merge) = match (t.open_block, t.last_block) {
            (Some(open), _) => (open, true),
            (None, Some(last)) => (last.saturating_add(1), false),
            (None, None) => (0, false),
        };
        Some(Self {
            wire,
            id: t.id.clone(),
            choice: t.choice.unwrap_or(0),
            base,
            merge,
            skip,
            finish: false,
            terminal: false,
        })
    }

    /// Whether the continuation ended as a complete answer: a finish reason and the terminal
    /// marker.
    pub(crate) fn complete(&self) -> bool {
        self.finish && self.terminal
    }

    /// Writes what the caller gets for one event of the continuation into `out` (nothing for an
    /// event dropped), and notes it in `t`.
    pub(crate) fn event(
        &mut self,
        frame: Frame<'_>,
        ev: &SseEvent,
        t: &mut Transcript,
        out: &mut BytesMut,
    ) {
        // Comments, malformed events and the continuation's own error event (its failure
        // follows from the body) are not the caller's.
        let Frame::Event { name, data, start } = frame else {
            return;
        };
        if ev.error.is_some() || matches!(ev.kind, EventKind::Comment | EventKind::Malformed) {
            return;
        }
        let data = data.trim_ascii();
        let rewritten = match self.wire {
            Wire::OpenAi => self.openai(data, ev),
            Wire::Anthropic => self.anthropic(name.trim_ascii(), data, ev),
        };
        let Some((name, data)) = rewritten else {
            return;
        };
        write_event(out, name, &data);
        t.observe(
            Frame::Event {
                name,
                data: &data,
                start,
            },
            ev,
        );
    }

    /// Drops the skipped whitespace from the start of `text`; `None` when it stays as it is.
    fn strip(&mut self, text: &str) -> Option<String> {
        if self.skip.is_empty() || text.is_empty() {
            return None;
        }
        if let Some(rest) = text.strip_prefix(self.skip.as_str()) {
            self.skip.clear();
            Some(rest.to_owned())
        } else if self.skip.starts_with(text) {
            self.skip.drain(..text.len());
            Some(String::new())
        } else {
            // The continuation did not start with that whitespace: its text stays whole.
            self.skip.clear();
            None
        }
    }

    fn openai(&mut self, data: &[u8], ev: &SseEvent) -> Option<(&'static [u8], Vec<u8>)> {
        if data == b"[DONE]" {
            self.terminal = true;
            return Some((b"", data.to_vec()));
        }
        let mut v = serde_json::from_slice::<Value>(data).ok()?;
        let obj = v.as_object_mut()?;
        let choices = obj.get_mut("choices")?.as_array_mut()?;
        if let Some(choice) = choices.first_mut().and_then(Value::as_object_mut) {
            choice.insert("index".to_owned(), Value::from(self.choice));
            if let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) {
                let role = delta.remove("role").is_some();
                let text = delta
                    .get("content")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if let Some(stripped) = text.as_deref().and_then(|t| self.strip(t)) {
                    delta.insert("content".to_owned(), Value::from(stripped));
                }
                let empty = delta
                    .get("content")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty);
                let other = delta
                    .iter()
                    .any(|(k, v)| k != "content" && present(Some(v)));
                // The role was announced in the caller's stream already; a chunk that only
                // said it (or only carried skipped whitespace) says nothing new.
                if (role || text.is_some()) && empty && !other && ev.finish.is_none() {
                    return None;
                }
            }
        }
        if let Some(id) = &self.id {
            obj.insert("id".to_owned(), Value::from(id.as_str()));
        }
        if ev.finish.is_some() {
            self.finish = true;
        }
        serde_json::to_vec(&v).ok().map(|d| (&b""[..], d))
    }

    fn anthropic<'a>(
        &mut self,
        name: &'a [u8],
        data: &[u8],
        ev: &SseEvent,
    ) -> Option<(&'a [u8], Vec<u8>)> {
        let mut v = serde_json::from_slice::<Value>(data).ok()?;
        let kind: &'a [u8] = match name {
            b"" | b"message" => match object_type(&v) {
                Some("content_block_start") => b"content_block_start",
                Some("content_block_delta") => b"content_block_delta",
                Some("content_block_stop") => b"content_block_stop",
                Some("message_start") => b"message_start",
                Some("message_delta") => b"message_delta",
                Some("message_stop") => b"message_stop",
                _ => b"",
            },
            n => n,
        };
        if kind == b"message_start" {
            return None;
        }
        let block = matches!(
            kind,
            b"content_block_start" | b"content_block_delta" | b"content_block_stop"
        );
        if block {
            let k = index_of(&v);
            if kind == b"content_block_start" && self.merge && k == 0 {
                return None;
            }
            if kind == b"content_block_delta" {
                let text = v
                    .get("delta")
                    .and_then(|d| d.get("text"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                if let Some(stripped) = text.as_deref().and_then(|t| self.strip(t)) {
                    if stripped.is_empty() {
                        return None;
                    }
                    if let Some(d) = v.get_mut("delta").and_then(Value::as_object_mut) {
                        d.insert("text".to_owned(), Value::from(stripped));
                    }
                }
            }
            if let Some(obj) = v.as_object_mut() {
                obj.insert("index".to_owned(), Value::from(self.base.saturating_add(k)));
            }
        }
        if ev.finish.is_some() {
            self.finish = true;
        }
        if ev.terminal {
            self.terminal = true;
        }
        serde_json::to_vec(&v).ok().map(|d| (kind, d))
    }
}

/// Writes one event: its name, its data (one `data:` line per line), a blank line.
pub(crate) fn write_event(out: &mut BytesMut, name: &[u8], data: &[u8]) {
    if !name.is_empty() {
        out.put_slice(b"event: ");
        out.put_slice(name);
        out.put_u8(b'\n');
    }
    for line in data.split(|&b| b == b'\n') {
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::event::Scanner;

    fn observe_all(t: &mut Transcript, stream: &str) {
        let mut s = Scanner::new();
        s.feed_frames(stream.as_bytes(), &mut |f, ev| t.observe(f, &ev));
        s.finish_frames(&mut |f, ev| t.observe(f, &ev));
    }

    fn splice(t: &mut Transcript, skip: &str, stream: &str) -> (String, bool) {
        let mut sp = Splicer::new(t, skip.to_owned()).unwrap_or_else(|| panic!("a wire"));
        let mut out = BytesMut::new();
        let mut s = Scanner::new();
        s.feed_frames(stream.as_bytes(), &mut |f, ev| {
            sp.event(f, &ev, t, &mut out)
        });
        s.finish_frames(&mut |f, ev| sp.event(f, &ev, t, &mut out));
        (String::from_utf8_lossy(&out).into_owned(), sp.complete())
    }

    const OPENAI_START: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
    );

    #[test]
    fn openai_text_and_splice() {
        let mut t = Transcript::new(1024);
        observe_all(&mut t, OPENAI_START);
        assert_eq!(t.continuable(), Ok(Wire::OpenAi));
        assert_eq!(t.text(), "Hel");
        let cont = concat!(
            "data: {\"id\":\"c2\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c2\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c2\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        let (out, complete) = splice(&mut t, "", cont);
        assert!(complete);
        assert!(!out.contains("role"), "{out}");
        assert!(!out.contains("c2"), "{out}");
        assert_eq!(out.matches("\"id\":\"c1\"").count(), 2, "{out}");
        assert!(out.ends_with("data: [DONE]\n\n"));
        assert_eq!(t.text(), "Hello");
        assert_eq!(t.continuable(), Err("the answer had ended"));
    }

    #[test]
    fn what_cannot_be_continued() {
        let mut t = Transcript::new(1024);
        observe_all(
            &mut t,
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0}]}}]}\n\n",
        );
        assert!(t.continuable().is_err());
        let mut t = Transcript::new(2);
        observe_all(&mut t, OPENAI_START);
        assert_eq!(
            t.continuable(),
            Err("the answer is longer than `max_buffer`")
        );
        let mut t = Transcript::new(1024);
        observe_all(
            &mut t,
            "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Hel\"}]}}]}\n\n",
        );
        assert!(t.continuable().is_err());
        let mut t = Transcript::new(1024);
        observe_all(
            &mut t,
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}},{\"index\":1,\"delta\":{\"content\":\"b\"}}]}\n\n",
        );
        assert_eq!(t.continuable(), Err("several choices"));
    }

    #[test]
    fn anthropic_blocks_go_on() {
        let start = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m1\"}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello \"}}\n\n",
        );
        let cont = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m2\"}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" world\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        // The block the caller has open goes on; the prefill left the trailing space out.
        let mut t = Transcript::new(1024);
        observe_all(&mut t, start);
        assert_eq!(t.continuable(), Ok(Wire::Anthropic));
        let (out, complete) = splice(&mut t, " ", cont);
        assert!(complete);
        assert!(!out.contains("message_start"));
        assert_eq!(out.matches("content_block_start").count(), 2, "{out}");
        assert!(out.contains("\"index\":1"));
        assert_eq!(t.text(), "Hello world");
        // After a closed block, the continuation's blocks come after it.
        let mut t = Transcript::new(1024);
        observe_all(
            &mut t,
            &format!(
                "{start}event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":0}}\n\n"
            ),
        );
        let (out, _) = splice(&mut t, "", cont);
        assert!(!out.contains("\"index\":0"), "{out}");
        assert!(out.contains("\"index\":2"), "{out}");
    }

    #[test]
    fn a_continuation_without_terminal_is_not_complete() {
        let mut t = Transcript::new(1024);
        observe_all(&mut t, OPENAI_START);
        let cont = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\n";
        assert!(!splice(&mut t, "", cont).1);
    }
}

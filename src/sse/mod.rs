//! Server-sent events: the framing of a byte stream into events, and what each event of a
//! model API's stream means ([`event`]).
//!
//! The framing takes chunks as they come off the wire, split anywhere (inside a line, between
//! `\r` and `\n`), and hands over each complete event once: its `event` name and its `data`
//! (lines joined with `\n`). It keeps one reusable line buffer and one data buffer, so after the
//! first events it does not allocate, and it holds at most a bounded line or event: a longer one
//! is dropped and reported as oversized, so a stream can never make its memory grow without
//! bound.

pub(crate) mod event;
pub(crate) mod splice;

/// The longest line or event payload the framing holds by default.
pub(crate) const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// What the framing hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// A `:` comment line.
    Comment,
    /// A complete event.
    Event {
        /// Its `event` field (empty when it had none).
        name: &'a [u8],
        /// Its `data` lines, joined with `\n`.
        data: &'a [u8],
        /// Where its first line starts, counted in bytes from the start of the stream.
        start: u64,
    },
    /// An event (or a line of it) longer than the bound, dropped.
    Oversized,
}

/// The incremental SSE framing.
#[derive(Debug)]
pub(crate) struct Framer {
    /// The start of a line whose end has not arrived yet.
    pub(crate) line: Vec<u8>,
    /// The `data` of the event being built (lines joined with `\n`).
    pub(crate) data: Vec<u8>,
    /// The `event` name of the event being built.
    pub(crate) event: Vec<u8>,
    has_data: bool,
    /// The last chunk ended with `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    /// The current line outgrew the bound: the rest of it is dropped.
    skip_line: bool,
    /// The event being built outgrew the bound: it ends as an oversized event.
    oversized: bool,
    /// No line has been processed yet: a byte order mark may start it.
    first_line: bool,
    /// The longest line or event payload held.
    max: usize,
    /// Bytes fed so far.
    pos: u64,
    /// The end of the last line after which no event was in progress: every byte before it
    /// belongs to events already handed over (or to comments and fields of no event).
    rest: u64,
}

impl Default for Framer {
    fn default() -> Self {
        Self::with_limit(MAX_EVENT_BYTES)
    }
}

impl Framer {
    /// A framing that holds lines and events of up to `max` bytes.
    pub(crate) fn with_limit(max: usize) -> Self {
        Self {
            line: Vec::new(),
            data: Vec::new(),
            event: Vec::new(),
            has_data: false,
            after_cr: false,
            skip_line: false,
            oversized: false,
            first_line: true,
            max,
            pos: 0,
            rest: 0,
        }
    }

    /// Where the stream is at rest: every byte before this position belongs to events already
    /// handed over, so a stream cut there loses no part of an event.
    pub(crate) fn rest(&self) -> u64 {
        self.rest
    }

    fn at_rest(&self) -> bool {
        !self.has_data && self.event.is_empty() && !self.oversized && !self.skip_line
    }

    /// Frames the next chunk, handing over every event it completes.
    pub(crate) fn feed(&mut self, mut chunk: &[u8], on_frame: &mut impl FnMut(Frame<'_>)) {
        if chunk.is_empty() {
            return;
        }
        // Positions are only read at line ends, so they are counted from the chunk's start.
        let mut at = self.pos;
        self.pos += chunk.len() as u64;
        if self.after_cr {
            self.after_cr = false;
            if let [b'\n', rest @ ..] = chunk {
                chunk = rest;
                at += 1;
                if self.at_rest() {
                    self.rest = at;
                }
            }
        }
        while let Some(pos) = memchr::memchr2(b'\n', b'\r', chunk) {
            let mut next = pos + 1;
            if chunk[pos] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.end_line(&chunk[..pos], on_frame);
            chunk = &chunk[next..];
            at += next as u64;
            if self.at_rest() {
                self.rest = at;
            }
        }
        if self.skip_line {
            return;
        }
        if self.line.len() + chunk.len() > self.max {
            self.drop_line();
        } else {
            self.line.extend_from_slice(chunk);
        }
    }

    /// Drops the current, oversized line, and with it the event it belongs to.
    fn drop_line(&mut self) {
        self.line.clear();
        self.skip_line = true;
        self.oversized = true;
    }

    /// The stream ended: an unterminated last line and a last event without its blank line are
    /// still handed over (servers that close right after `data: [DONE]` are common).
    pub(crate) fn finish(&mut self, on_frame: &mut impl FnMut(Frame<'_>)) {
        self.after_cr = false;
        if !self.line.is_empty() || self.skip_line {
            self.end_line(&[], on_frame);
        }
        if self.has_data || !self.event.is_empty() || self.oversized {
            self.dispatch(on_frame);
        }
        self.rest = self.pos;
    }

    fn end_line(&mut self, tail: &[u8], on_frame: &mut impl FnMut(Frame<'_>)) {
        if self.skip_line || self.line.len() + tail.len() > self.max {
            // The end of a line too long to hold: nothing of it is looked at.
            self.line.clear();
            self.skip_line = false;
            self.oversized = true;
            return;
        }
        if self.line.is_empty() {
            self.process_line(tail, on_frame);
        } else {
            // Keep the buffer's capacity: take it out, use it, put it back empty.
            let mut line = std::mem::take(&mut self.line);
            line.extend_from_slice(tail);
            self.process_line(&line, on_frame);
            line.clear();
            self.line = line;
        }
    }

    fn process_line(&mut self, line: &[u8], on_frame: &mut impl FnMut(Frame<'_>)) {
        // A byte order mark before the stream's first line is not part of it.
        let line = match std::mem::replace(&mut self.first_line, false) {
            true => line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line),
            false => line,
        };
        if line.is_empty() {
            if self.has_data || !self.event.is_empty() || self.oversized {
                self.dispatch(on_frame);
            }
            return;
        }
        if line[0] == b':' {
            on_frame(Frame::Comment);
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.data.len() + value.len() + 1 > self.max {
                    self.data.clear();
                    self.oversized = true;
                } else if !self.oversized {
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                }
                self.has_data = true;
            }
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            // `id`, `retry` and unknown fields mean nothing here.
            _ => {}
        }
    }

    fn dispatch(&mut self, on_frame: &mut impl FnMut(Frame<'_>)) {
        if self.oversized {
            self.oversized = false;
            on_frame(Frame::Oversized);
        } else {
            // Nothing moves `rest` while an event is in progress: it is where the event began.
            on_frame(Frame::Event {
                name: &self.event,
                data: &self.data,
                start: self.rest,
            });
        }
        self.data.clear();
        self.event.clear();
        self.has_data = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_and_event_starts_are_the_same_over_any_split() {
        let s: &[u8] = b"data: a\n\n: c\n\nid: 1\nevent: e\ndata: b\r\n\r\ndata: x";
        let pos = |needle: &[u8]| {
            s.windows(needle.len())
                .position(|w| w == needle)
                .unwrap_or(usize::MAX) as u64
        };
        let (comment, id, last) = (pos(b": c"), pos(b"id: 1"), pos(b"data: x"));
        // Every line end with no event in progress: after an event's blank line, a comment
        // line, a blank line, a field of no event (`id`); a `\r\n` split after its `\r` ends
        // the line there.
        let boundaries = [
            0,
            comment,
            comment + 4,
            id,
            pos(b"event: e"),
            last - 1,
            last,
        ];
        for split in 0..=s.len() {
            let mut f = Framer::default();
            let mut starts = Vec::new();
            let mut on = |frame: Frame<'_>| {
                if let Frame::Event { start, .. } = frame {
                    starts.push(start);
                }
            };
            f.feed(&s[..split], &mut on);
            assert!(f.rest() <= split as u64, "{split}");
            assert!(boundaries.contains(&f.rest()), "{split}: {}", f.rest());
            f.feed(&s[split..], &mut on);
            assert_eq!(f.rest(), last, "{split}");
            f.finish(&mut on);
            assert_eq!(f.rest(), s.len() as u64);
            assert_eq!(starts, [0, pos(b"event: e"), last], "{split}");
        }
    }
}

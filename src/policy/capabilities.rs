use serde_json::Value;

/// What a route can serve. A request that needs more is never sent to it: the route is
/// skipped (and the skip logged), the primary as well as a backup.
///
/// Every field defaults to "supported" (and no context bound), so a route declares only
/// what it lacks:
///
/// ```toml
/// [[fallback.routes]]
/// name = "small-local"
/// capabilities = { context_tokens = 8192, vision = false, tools = false }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct Capabilities {
    /// The route's context window, in tokens: a request whose estimate (input and the most
    /// output it asks for) is larger is not sent. Unbounded when unset.
    pub context_tokens: Option<u64>,
    /// Tool (function) calling.
    pub tools: bool,
    /// Image inputs.
    pub vision: bool,
    /// JSON mode and structured outputs (`response_format`, Gemini's `responseMimeType`).
    pub json_mode: bool,
    /// Streamed answers.
    pub streaming: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            context_tokens: None,
            tools: true,
            vision: true,
            json_mode: true,
            streaming: true,
        }
    }
}

impl Capabilities {
    /// Why a route with these capabilities cannot serve a request with `needs`, or `None`
    /// when it can.
    pub fn lacks(&self, needs: &RequestNeeds) -> Option<&'static str> {
        if self
            .context_tokens
            .is_some_and(|max| needs.context_tokens > max)
        {
            return Some("the request needs a larger context than the route has");
        }
        let missing = [
            (
                needs.tools && !self.tools,
                "the request uses tools; the route has none",
            ),
            (
                needs.vision && !self.vision,
                "the request has images; the route takes none",
            ),
            (
                needs.json_mode && !self.json_mode,
                "the request asks for JSON mode; the route has none",
            ),
            (
                needs.streaming && !self.streaming,
                "the request is streamed; the route does not stream",
            ),
        ];
        missing
            .into_iter()
            .find(|(lacks, _)| *lacks)
            .map(|(_, why)| why)
    }
}

/// What a request needs of the route that serves it: read once from its body (the fallback
/// layer does so only when some route declares [`Capabilities`] it lacks), or set by the
/// caller as a request extension, which is then taken as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RequestNeeds {
    /// Tokens of context: the input estimate and the most output the request asks for.
    pub context_tokens: u64,
    /// The request offers tools (`tools`, `functions`).
    pub tools: bool,
    /// The request has an image input.
    pub vision: bool,
    /// The request asks for JSON or a schema.
    pub json_mode: bool,
    /// The request asks for a stream.
    pub streaming: bool,
}

impl RequestNeeds {
    /// Needs stated by the caller.
    pub const fn new(context_tokens: u64) -> Self {
        Self {
            context_tokens,
            tools: false,
            vision: false,
            json_mode: false,
            streaming: false,
        }
    }

    /// Builder: needs tools.
    pub const fn tools(mut self) -> Self {
        self.tools = true;
        self
    }

    /// Builder: needs image input.
    pub const fn vision(mut self) -> Self {
        self.vision = true;
        self
    }

    /// Builder: needs JSON mode.
    pub const fn json_mode(mut self) -> Self {
        self.json_mode = true;
        self
    }

    /// Builder: needs streaming.
    pub const fn streaming(mut self) -> Self {
        self.streaming = true;
        self
    }

    /// The needs of a request body in the OpenAI, Anthropic or Gemini shape, with
    /// `context_tokens` estimated elsewhere; `None` when the body is not a JSON object.
    pub fn of_body(body: &[u8], context_tokens: u64) -> Option<Self> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let obj = v.as_object()?;
        let non_empty = |k: &str| {
            obj.get(k)
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
        };
        let json_mode = obj
            .get("response_format")
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t == "json_object" || t == "json_schema")
            || ["generationConfig", "generation_config"].iter().any(|k| {
                obj.get(*k).is_some_and(|g| {
                    ["responseMimeType", "response_mime_type"]
                        .iter()
                        .any(|m| g.get(*m).and_then(Value::as_str) == Some("application/json"))
                })
            });
        Some(Self {
            context_tokens,
            tools: non_empty("tools") || non_empty("functions"),
            vision: has_image(obj.get("messages")) || has_image(obj.get("contents")),
            json_mode,
            streaming: obj.get("stream").and_then(Value::as_bool) == Some(true),
        })
    }
}

/// Whether a list of messages (OpenAI, Anthropic) or contents (Gemini) holds an image part.
fn has_image(list: Option<&Value>) -> bool {
    let Some(items) = list.and_then(Value::as_array) else {
        return false;
    };
    items.iter().any(|m| {
        let parts = m.get("content").or_else(|| m.get("parts"));
        parts.and_then(Value::as_array).is_some_and(|parts| {
            parts.iter().any(|p| {
                let kind = p.get("type").and_then(Value::as_str);
                matches!(kind, Some("image_url" | "image" | "input_image"))
                    || p.get("inline_data").is_some()
                    || p.get("inlineData").is_some()
                    || p.get("file_data").is_some()
                    || p.get("fileData").is_some()
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_are_read_from_each_providers_shape() {
        let openai = br#"{"model":"m","stream":true,"tools":[{"type":"function"}],
            "response_format":{"type":"json_schema"},
            "messages":[{"role":"user","content":[{"type":"text","text":"hi"},
            {"type":"image_url","image_url":{"url":"data:"}}]}]}"#;
        let n = RequestNeeds::of_body(openai, 10).unwrap_or_default();
        assert_eq!(
            n,
            RequestNeeds::new(10)
                .tools()
                .vision()
                .json_mode()
                .streaming()
        );
        let anthropic = br#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"image","source":{"type":"base64"}}]}],"tools":[]}"#;
        let n = RequestNeeds::of_body(anthropic, 1).unwrap_or_default();
        assert_eq!(n, RequestNeeds::new(1).vision());
        let gemini =
            br#"{"contents":[{"parts":[{"text":"x"},{"inlineData":{"mimeType":"image/png"}}]}],
            "generationConfig":{"responseMimeType":"application/json"}}"#;
        let n = RequestNeeds::of_body(gemini, 1).unwrap_or_default();
        assert_eq!(n, RequestNeeds::new(1).vision().json_mode());
        let plain = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}"#;
        assert_eq!(RequestNeeds::of_body(plain, 3), Some(RequestNeeds::new(3)));
        assert_eq!(RequestNeeds::of_body(b"not json", 3), None);
        assert_eq!(RequestNeeds::of_body(b"[1]", 3), None);
    }

    #[test]
    fn a_route_says_what_it_lacks() {
        let small = Capabilities {
            context_tokens: Some(8192),
            vision: false,
            ..Capabilities::default()
        };
        assert_eq!(small.lacks(&RequestNeeds::new(8192)), None);
        assert!(
            small
                .lacks(&RequestNeeds::new(8193))
                .is_some_and(|w| w.contains("context"))
        );
        assert!(
            small
                .lacks(&RequestNeeds::new(10).vision())
                .is_some_and(|w| w.contains("images"))
        );
        assert_eq!(
            small.lacks(&RequestNeeds::new(10).tools().streaming()),
            None
        );
        assert_eq!(
            Capabilities::default().lacks(&RequestNeeds::new(u64::MAX).vision()),
            None
        );
    }
}

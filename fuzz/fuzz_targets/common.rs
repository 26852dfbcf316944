//! The fuzz inputs' shared shape: a response head written as text, so seeds read like the
//! providers' real responses and the fuzzer mutates names, values and bodies alike.
//!
//! ```text
//! 429                      <- status (first line; anything unparsable means 500)
//! retry-after: 2           <- header lines, up to the first empty line
//! x-ratelimit-reset-tokens: 6m0s
//!
//! {"error":{...}}          <- body: every byte after the empty line
//! ```
#![allow(dead_code)]

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Splits `data` into lines at `\n` (a trailing `\r` is part of the value, as on the wire it
/// would be rejected; the fuzzer gets to try both).
fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Header lines up to the first empty line; returns the headers and the rest (the body).
pub fn headers(mut data: &[u8]) -> (HeaderMap, &[u8]) {
    let mut map = HeaderMap::new();
    while !data.is_empty() {
        let (line, rest) = split_line(data);
        data = rest;
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let mut value = &line[colon + 1..];
        while let [b' ', tail @ ..] = value {
            value = tail;
        }
        // Only what a real response could carry: invalid names or values are skipped, as
        // hyper would have rejected the response.
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    (map, data)
}

/// A status line, then headers, then the body.
pub fn response(data: &[u8]) -> (StatusCode, HeaderMap, &[u8]) {
    let (line, rest) = split_line(data);
    let status = std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (headers, body) = headers(rest);
    (status, headers, body)
}

//! `wrap_response on;` (LANGUAGE.md §4): a JSON upstream response becomes
//! `{"data": <body>, "timestamp": "<RFC 3339>", "correlationId": "<id>"}`.
//!
//! Runs on the response after the cache (the cache stores the upstream's
//! body; the timestamp and id belong to each answer). Anything that is not
//! JSON, is compressed, is over the limit or does not parse goes through
//! unchanged and still streaming: at most `max + 1` bytes are ever held.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::Response;
use http::header::{self, HeaderMap, HeaderValue};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::observe::access_log::httpdate_rfc3339;
use crate::proxy::forward::{Body, BoxError, full_body};

/// Wrap `resp` when it is JSON of at most `max` bytes; otherwise return it
/// unchanged (same head, same bytes, streamed).
pub async fn wrap(
    resp: Response<Body>,
    max: u64,
    request_id: &str,
    now: SystemTime,
) -> Response<Body> {
    if !is_json(resp.headers()) || resp.headers().contains_key(header::CONTENT_ENCODING) {
        return resp;
    }
    let announced = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > max) {
        return resp;
    }
    let (mut parts, mut body) = resp.into_parts();
    // Read at most max + 1 bytes: one byte past the limit proves it is over.
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut len: u64 = 0;
    let mut trailers = false;
    while len <= max {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Response::from_parts(parts, Prefixed::failed(frames, e)),
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    len += d.len() as u64;
                } else {
                    trailers = true;
                }
                frames.push_back(frame);
            }
        }
    }
    if len > max || trailers {
        return Response::from_parts(parts, Prefixed::chain(frames, body));
    }
    let mut raw = BytesMut::with_capacity(len as usize);
    for f in &frames {
        if let Some(d) = f.data_ref() {
            raw.extend_from_slice(d);
        }
    }
    let raw = raw.freeze();
    if serde_json::from_slice::<serde::de::IgnoredAny>(&raw).is_err() {
        return Response::from_parts(parts, full_body(raw));
    }
    let id = serde_json::Value::from(request_id).to_string();
    let stamp = httpdate_rfc3339(now);
    let mut out = BytesMut::with_capacity(raw.len() + stamp.len() + id.len() + 48);
    out.extend_from_slice(b"{\"data\":");
    out.extend_from_slice(&raw);
    out.extend_from_slice(b",\"timestamp\":\"");
    out.extend_from_slice(stamp.as_bytes());
    out.extend_from_slice(b"\",\"correlationId\":");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"}");
    let h = &mut parts.headers;
    // The bytes changed: validators and digests of the upstream's bytes no
    // longer describe them.
    for name in [
        "etag",
        "content-md5",
        "digest",
        "content-digest",
        "repr-digest",
        "content-range",
    ] {
        h.remove(name);
    }
    h.remove(header::TRANSFER_ENCODING);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(out.len()));
    if !is_plain_json(h) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    Response::from_parts(parts, full_body(out.freeze()))
}

fn media_type(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

/// `application/json` or a `+json` suffix type (`application/problem+json`).
fn is_json(h: &HeaderMap) -> bool {
    media_type(h)
        .is_some_and(|m| m == "application/json" || (m.contains('/') && m.ends_with("+json")))
}

fn is_plain_json(h: &HeaderMap) -> bool {
    media_type(h).is_some_and(|m| m == "application/json")
}

/// The frames already read, then the rest of the body (or the error that
/// cut it).
struct Prefixed {
    prefix: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
    error: Option<BoxError>,
}

impl Prefixed {
    fn chain(prefix: VecDeque<Frame<Bytes>>, rest: Body) -> Body {
        Body::new(Prefixed {
            prefix,
            rest: Some(rest),
            error: None,
        })
    }

    fn failed(prefix: VecDeque<Frame<Bytes>>, error: BoxError) -> Body {
        Body::new(Prefixed {
            prefix,
            rest: None,
            error: Some(error),
        })
    }
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(f) = this.prefix.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty()
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .prefix
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let mut hint = self
            .rest
            .as_ref()
            .map(|r| r.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0));
        // Raise the upper bound first: set_lower asserts lower <= upper.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + buffered);
        }
        hint.set_lower(hint.lower() + buffered);
        hint
    }
}

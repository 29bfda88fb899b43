//! `wrap_response`: JSON is wrapped with the right length; everything else
//! goes through byte for byte, and what is too large keeps streaming.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use tollgate::observe::access_log::httpdate_rfc3339;
use tollgate::policy::wrap::wrap;
use tollgate::proxy::forward::{Body, BoxError};

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250)
}

fn resp(content_type: Option<&str>, body: &'static [u8], with_length: bool) -> Response<Body> {
    let mut r = Response::builder().status(200).header("x-up", "1");
    if let Some(ct) = content_type {
        r = r.header("content-type", ct);
    }
    if with_length {
        r = r.header("content-length", body.len());
    }
    r.body(Body::new(
        Full::new(Bytes::from_static(body)).map_err(|never| match never {}),
    ))
    .expect("response")
}

async fn read(r: Response<Body>) -> (http::response::Parts, Bytes) {
    let (parts, b) = r.into_parts();
    (parts, b.collect().await.expect("body").to_bytes())
}

#[tokio::test]
async fn json_is_wrapped_with_its_length() {
    for ct in [
        "application/json",
        "application/json; charset=utf-8",
        "application/problem+json",
    ] {
        let body: &'static [u8] = br#"{"b": [1, 2.50, "x"], "a": null}"#;
        let r = wrap(resp(Some(ct), body, true), 1024, "req-\"1\"", now()).await;
        let (parts, out) = read(r).await;
        assert_eq!(
            parts.headers["content-length"],
            out.len().to_string().as_str(),
            "{ct}"
        );
        assert_eq!(parts.headers["x-up"], "1");
        let ct_out = parts.headers["content-type"].to_str().expect("ascii");
        assert!(ct_out.starts_with("application/json"), "{ct_out}");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["correlationId"], "req-\"1\"");
        assert_eq!(v["timestamp"], httpdate_rfc3339(now()).as_str());
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.250Z");
        assert_eq!(
            v["data"],
            serde_json::from_slice::<serde_json::Value>(body).expect("json")
        );
        // The upstream's bytes are embedded as sent (member order, number form).
        assert!(
            out.starts_with(b"{\"data\":{\"b\": [1, 2.50, \"x\"], \"a\": null},"),
            "{out:?}"
        );
    }
}

#[tokio::test]
async fn json_without_length_and_at_the_limit_is_wrapped() {
    let body: &'static [u8] = b"[1,2,3]";
    let r = wrap(
        resp(Some("application/json"), body, false),
        body.len() as u64,
        "id",
        now(),
    )
    .await;
    let (parts, out) = read(r).await;
    assert_eq!(
        parts.headers["content-length"],
        out.len().to_string().as_str()
    );
    let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(v["data"], serde_json::json!([1, 2, 3]));
}

/// Passed through: same status, same headers, same bytes.
async fn untouched(r: Response<Body>, max: u64, body: &[u8]) {
    let before = r.headers().clone();
    let (parts, out) = read(wrap(r, max, "id", now()).await).await;
    assert_eq!(parts.headers, before);
    assert_eq!(&out[..], body);
}

#[tokio::test]
async fn other_responses_pass_through_unchanged() {
    untouched(
        resp(Some("text/html"), b"<p>hi</p>", true),
        1024,
        b"<p>hi</p>",
    )
    .await;
    untouched(resp(Some("application/jsonp"), b"[1]", true), 1024, b"[1]").await;
    untouched(resp(None, b"[1]", false), 1024, b"[1]").await;
    // Invalid JSON, with and without a length.
    untouched(
        resp(Some("application/json"), b"{\"a\":", true),
        1024,
        b"{\"a\":",
    )
    .await;
    untouched(
        resp(Some("application/json"), b"[1] x", false),
        1024,
        b"[1] x",
    )
    .await;
    untouched(resp(Some("application/json"), b"", false), 1024, b"").await;
    // Too large, announced and not.
    untouched(
        resp(Some("application/json"), b"[1,2,3,4]", true),
        8,
        b"[1,2,3,4]",
    )
    .await;
    untouched(
        resp(Some("application/json"), b"[1,2,3,4]", false),
        8,
        b"[1,2,3,4]",
    )
    .await;
    // Compressed JSON cannot be wrapped.
    let mut gz = resp(Some("application/json"), b"[1]", true);
    gz.headers_mut()
        .insert("content-encoding", "gzip".parse().expect("value"));
    untouched(gz, 1024, b"[1]").await;
}

struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn streaming(with_length: Option<usize>) -> (tokio::sync::mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut r = Response::builder().header("content-type", "application/json");
    if let Some(n) = with_length {
        r = r.header("content-length", n);
    }
    (tx, r.body(Body::new(ChannelBody(rx))).expect("response"))
}

#[tokio::test]
async fn too_large_streams_without_waiting_for_the_end() {
    // Announced: returned before any byte arrives.
    let (tx, r) = streaming(Some(10_000));
    let r = wrap(r, 100, "id", now()).await;
    assert_eq!(r.headers()["content-length"], "10000");
    tx.send(Bytes::from(vec![b'1'; 10_000]))
        .await
        .expect("send");
    drop(tx);
    assert_eq!(read(r).await.1.len(), 10_000);

    // Not announced: at most max + 1 bytes are read, then the rest streams.
    let (tx, r) = streaming(None);
    tx.send(Bytes::from_static(b"[1,2,3,")).await.expect("send");
    tx.send(Bytes::from_static(b"4,5,6,")).await.expect("send");
    let r = wrap(r, 10, "id", now()).await;
    assert!(r.headers().get("content-length").is_none());
    let mut body = r.into_body();
    let mut got = Vec::new();
    for _ in 0..2 {
        let f = body.frame().await.expect("frame").expect("ok");
        got.extend_from_slice(&f.into_data().expect("data"));
    }
    assert_eq!(&got[..], b"[1,2,3,4,5,6,");
    tx.send(Bytes::from_static(b"7]")).await.expect("send");
    drop(tx);
    let rest = body.collect().await.expect("body").to_bytes();
    assert_eq!(&rest[..], b"7]");
}

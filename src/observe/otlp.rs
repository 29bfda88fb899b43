//! OTLP span export (cargo feature `otlp`): one server span per request,
//! sent as OTLP/HTTP JSON to `{OTEL_EXPORTER_OTLP_ENDPOINT}/v1/traces`.
//!
//! Configured from the standard environment variables, read once at
//! startup ([`start`]); without an endpoint nothing is exported and the
//! request path pays one atomic load.
//!
//! Like the access log, nothing here blocks a request: finished spans go
//! through a bounded channel to one exporter thread, which batches them and
//! POSTs each batch with the project's own hyper-util client (rustls with
//! aws-lc-rs for `https://`). When the channel is full, or a batch cannot
//! be delivered, its spans are dropped and counted
//! (`gateway_otlp_spans_dropped_total`).

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Uri};
use serde_json::{Value, json};

use crate::observe::metrics::METRICS;
use crate::observe::trace::TraceContext;

/// Spans waiting for the exporter, at most.
const QUEUE: usize = 8 * 1024;
/// Spans per request to the collector, at most
/// (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`'s default).
const BATCH: usize = 512;
/// Longest wait before a partial batch is sent (`OTEL_BSP_SCHEDULE_DELAY`).
const DEFAULT_DELAY: Duration = Duration::from_millis(5000);
/// One export's time limit (`OTEL_EXPORTER_OTLP_TIMEOUT`).
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// A collector's reply is read up to this much, then dropped.
const MAX_REPLY: usize = 64 * 1024;

/// The ids a request's span needs beyond its trace id: taken from its
/// [`TraceContext`] only when export is on and the trace is sampled.
#[derive(Debug, Clone)]
pub struct SpanIds {
    pub span_id: String,
    pub parent: Option<String>,
}

impl SpanIds {
    /// `None` when no span will be exported (no endpoint configured, or the
    /// caller's `traceparent` was not sampled).
    pub fn of(trace: &TraceContext) -> Option<SpanIds> {
        (enabled() && trace.sampled()).then(|| SpanIds {
            span_id: trace.span_id.to_string(),
            parent: trace.parent.map(|p| p.to_string()),
        })
    }
}

/// A finished request, as exported.
#[derive(Debug)]
pub struct Span {
    pub trace_id: String,
    pub ids: SpanIds,
    pub method: http::Method,
    pub route: Arc<str>,
    pub uri: Uri,
    pub status: u16,
    pub upstream_addr: Option<String>,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// Where and how spans are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The full traces URL (`…/v1/traces`).
    pub url: Uri,
    pub service_name: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub delay: Duration,
    pub timeout: Duration,
}

impl Settings {
    /// From the OpenTelemetry environment variables (through `var`):
    /// `Ok(None)` when no endpoint is set.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Settings>, String> {
        let set = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let url = match (
            set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            set("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            // The signal-specific variable is the URL as is; the generic one
            // is a base that the signal's path is appended to.
            (Some(u), _) => u,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        let url: Uri = url.parse().map_err(|e| format!("endpoint `{url}`: {e}"))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(format!("endpoint `{url}`: not an http:// or https:// URL"));
        }
        let mut headers = Vec::new();
        for h in [
            set("OTEL_EXPORTER_OTLP_HEADERS"),
            set("OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
        ]
        .into_iter()
        .flatten()
        {
            for pair in h.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| format!("header `{pair}`: expected key=value"))?;
                let v = percent_encoding::percent_decode_str(v.trim()).decode_utf8_lossy();
                let name = HeaderName::try_from(k.trim())
                    .map_err(|e| format!("header `{}`: {e}", k.trim()))?;
                let value = HeaderValue::try_from(&*v)
                    .map_err(|e| format!("header `{}`: {e}", k.trim()))?;
                headers.push((name, value));
            }
        }
        let millis = |k: &str, default: Duration| -> Result<Duration, String> {
            match set(k) {
                None => Ok(default),
                Some(v) => v
                    .parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("{k}=`{v}`: expected milliseconds")),
            }
        };
        Ok(Some(Settings {
            url,
            service_name: set("OTEL_SERVICE_NAME").unwrap_or_else(|| "tollgate".to_string()),
            headers,
            delay: millis("OTEL_BSP_SCHEDULE_DELAY", DEFAULT_DELAY)?,
            timeout: millis("OTEL_EXPORTER_OTLP_TIMEOUT", DEFAULT_TIMEOUT)?,
        }))
    }
}

static EXPORTER: OnceLock<Option<SyncSender<Span>>> = OnceLock::new();

/// Read the environment and start the exporter thread when an endpoint is
/// set. Once per process; later calls do nothing.
pub fn start() {
    EXPORTER.get_or_init(|| {
        let settings = match Settings::from_env(|k| std::env::var(k).ok()) {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!(error = %e, "OTLP export is off: bad OTEL_* setting");
                return None;
            }
        };
        if let Some(p) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .ok()
            .filter(|p| p.trim() != "http/json" && !p.trim().is_empty())
        {
            tracing::warn!(protocol = %p, "OTLP: only http/json is spoken; sending JSON");
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let url = settings.url.clone();
        match std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || exporter_loop(settings, rx))
        {
            Ok(_) => {
                tracing::info!(url = %url, "exporting spans over OTLP/HTTP JSON");
                Some(tx)
            }
            Err(e) => {
                tracing::error!(error = %e, "OTLP export is off: cannot start its thread");
                None
            }
        }
    });
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    matches!(EXPORTER.get(), Some(Some(_)))
}

/// Hand a finished span to the exporter; dropped and counted when it is
/// behind. Never waits.
pub fn export(span: Span) {
    if let Some(Some(tx)) = EXPORTER.get()
        && tx.try_send(span).is_err()
    {
        METRICS.otlp_spans_dropped.inc();
    }
}

fn exporter_loop(settings: Settings, rx: Receiver<Span>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "OTLP export is off: cannot start its runtime");
            return;
        }
    };
    let trust = crate::tls::system_trust();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*trust.config).clone())
        .https_or_http()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build::<_, http_body_util::Full<Bytes>>(https);
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
    let mut open = true;
    while open {
        match rx.recv() {
            Ok(s) => batch.push(s),
            Err(_) => return,
        }
        let deadline = Instant::now() + settings.delay;
        while batch.len() < BATCH {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(s) => batch.push(s),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let body = encode(&settings.service_name, &batch);
        let n = batch.len();
        batch.clear();
        let sent = rt.block_on(async {
            tokio::time::timeout(settings.timeout, post(&client, &settings, body))
                .await
                .unwrap_or_else(|_| Err("timed out".to_string()))
        });
        if let Err(e) = sent {
            METRICS.otlp_spans_dropped.inc_by(n as u64);
            tracing::warn!(url = %settings.url, error = %e, spans = n, "OTLP export failed; spans dropped");
        }
    }
}

async fn post<C>(
    client: &hyper_util::client::legacy::Client<C, http_body_util::Full<Bytes>>,
    settings: &Settings,
    body: Vec<u8>,
) -> Result<(), String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    use http_body_util::BodyExt as _;
    let mut req = http::Request::post(settings.url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    for (k, v) in &settings.headers {
        req.headers_mut().append(k.clone(), v.clone());
    }
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    // Read (a bounded part of) the reply so the connection can be reused.
    let _ = http_body_util::Limited::new(resp.into_body(), MAX_REPLY)
        .collect()
        .await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {status}"))
    }
}

fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}

fn text(key: &str, value: &str) -> Value {
    json!({"key": key, "value": {"stringValue": value}})
}

/// `SPAN_KIND_SERVER`
const KIND_SERVER: u8 = 2;
/// `STATUS_CODE_ERROR`
const STATUS_ERROR: u8 = 2;

fn span_json(s: &Span) -> Value {
    let mut attributes = vec![
        text("http.request.method", s.method.as_str()),
        text("http.route", &s.route),
        // OTLP JSON carries 64-bit integers as strings.
        json!({"key": "http.response.status_code", "value": {"intValue": s.status.to_string()}}),
        text("url.path", s.uri.path()),
    ];
    if let Some(a) = &s.upstream_addr {
        attributes.push(text("server.address", a));
    }
    let mut v = json!({
        "traceId": s.trace_id,
        "spanId": s.ids.span_id,
        "name": format!("{} {}", s.method, s.route),
        "kind": KIND_SERVER,
        "startTimeUnixNano": unix_nanos(s.start),
        "endTimeUnixNano": unix_nanos(s.end),
        "attributes": attributes,
    });
    if let Some(p) = &s.ids.parent {
        v["parentSpanId"] = Value::from(p.as_str());
    }
    if s.status >= 500 {
        v["status"] = json!({"code": STATUS_ERROR});
    }
    v
}

/// An `ExportTraceServiceRequest` in OTLP's JSON encoding (ids as hex,
/// enums as numbers, 64-bit integers as strings).
pub fn encode(service_name: &str, spans: &[Span]) -> Vec<u8> {
    let spans: Vec<Value> = spans.iter().map(span_json).collect();
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [text("service.name", service_name)]},
            "scopeSpans": [{
                "scope": {"name": "tollgate", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans,
            }],
        }],
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn no_endpoint_no_export() {
        assert_eq!(Settings::from_env(env(&[])), Ok(None));
        assert_eq!(
            Settings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])),
            Ok(None)
        );
    }

    #[test]
    fn endpoint_and_service_name() {
        let s = Settings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20x, x-a=b",
            ),
        ]))
        .expect("valid")
        .expect("on");
        assert_eq!(s.url, "http://collector:4318/v1/traces");
        assert_eq!(s.service_name, "tollgate");
        assert_eq!(s.headers.len(), 2);
        assert_eq!(s.headers[0].1, "Bearer x");
        assert_eq!(s.delay, DEFAULT_DELAY);
        let s = Settings::from_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://c.example/otlp/traces",
            ),
            ("OTEL_SERVICE_NAME", "edge"),
        ]))
        .expect("valid")
        .expect("on");
        assert_eq!(s.url, "https://c.example/otlp/traces");
        assert_eq!(s.service_name, "edge");
        assert!(
            Settings::from_env(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")])).is_err()
        );
    }

    #[test]
    fn encodes_a_server_span() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let span = Span {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            ids: SpanIds {
                span_id: "1111111111111111".into(),
                parent: Some("00f067aa0ba902b7".into()),
            },
            method: http::Method::GET,
            route: Arc::from("/api/"),
            uri: Uri::from_static("/api/x?a=1"),
            status: 502,
            upstream_addr: Some("127.0.0.1:9".into()),
            start: t0,
            end: t0 + Duration::from_millis(3),
        };
        let v: Value = serde_json::from_slice(&encode("tollgate", &[span])).expect("json");
        let rs = &v["resourceSpans"][0];
        assert_eq!(
            rs["resource"]["attributes"][0]["value"]["stringValue"],
            "tollgate"
        );
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(s["name"], "GET /api/");
        assert_eq!(s["kind"], 2);
        assert_eq!(s["startTimeUnixNano"], "1700000000000000000");
        assert_eq!(s["endTimeUnixNano"], "1700000000003000000");
        assert_eq!(s["status"]["code"], 2);
        let attrs = s["attributes"].as_array().expect("attributes");
        let get = |k: &str| {
            attrs
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"].clone())
        };
        assert_eq!(get("url.path").expect("path")["stringValue"], "/api/x");
        assert_eq!(
            get("http.response.status_code").expect("status")["intValue"],
            "502"
        );
        assert_eq!(
            get("server.address").expect("addr")["stringValue"],
            "127.0.0.1:9"
        );
    }
}

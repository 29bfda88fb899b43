//! The access log (LANGUAGE.md §10, §13.14): one line per request, written
//! off the request path.
//!
//! Lines go through a bounded channel to one writer thread per target; when
//! the channel is full the line is dropped and counted
//! (`gateway_access_log_dropped_total`), never waited for. Files are
//! reopened on reload, so log rotation works with `mv` + `SIGHUP`.
//!
//! A line is written when the response body has been sent (or the client
//! went away), so `bytes_sent` and `duration_ms` cover the whole exchange:
//! [`LoggedBody`] wraps the response body and finishes the record.

use std::collections::HashMap;
use std::io::Write;
use std::pin::Pin;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::config::model::{AccessLog, AccessLogFormat, LogTarget};
use crate::observe::metrics::{METRICS, RequestLabels, RouteLabels};

const QUEUE: usize = 16 * 1024;

enum Msg {
    Line(String),
    Reopen,
}

struct Writer {
    tx: SyncSender<Msg>,
}

static WRITERS: LazyLock<Mutex<HashMap<LogTarget, Writer>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn open(target: &LogTarget) -> Box<dyn Write + Send> {
    match target {
        LogTarget::Stdout => Box::new(std::io::stdout()),
        LogTarget::Stderr => Box::new(std::io::stderr()),
        LogTarget::File(p) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                tracing::error!(path = %p.display(), error = %e, "cannot open access log; lines are discarded");
                Box::new(std::io::sink())
            }
        },
    }
}

fn writer_loop(target: LogTarget, rx: Receiver<Msg>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, open(&target));
    while let Ok(first) = rx.recv() {
        let mut msg = Some(first);
        while let Some(m) = msg.take() {
            match m {
                Msg::Line(l) => {
                    let _ = out.write_all(l.as_bytes());
                    let _ = out.write_all(b"\n");
                }
                Msg::Reopen => {
                    let _ = out.flush();
                    out = std::io::BufWriter::with_capacity(64 * 1024, open(&target));
                }
            }
            msg = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

fn sender(target: &LogTarget) -> Option<SyncSender<Msg>> {
    let mut w = WRITERS.lock().ok()?;
    if let Some(x) = w.get(target) {
        return Some(x.tx.clone());
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    let t = target.clone();
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || writer_loop(t, rx))
        .ok()?;
    w.insert(target.clone(), Writer { tx: tx.clone() });
    Some(tx)
}

/// Reopen every log file (on reload).
pub fn reopen_all() {
    if let Ok(w) = WRITERS.lock() {
        for x in w.values() {
            let _ = x.tx.try_send(Msg::Reopen);
        }
    }
}

fn emit(target: &LogTarget, line: String) {
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<(LogTarget, SyncSender<Msg>)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let tx = CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((_, tx)) = c.iter().find(|(t, _)| t == target) {
            return Some(tx.clone());
        }
        let tx = sender(target)?;
        c.push((target.clone(), tx.clone()));
        Some(tx)
    });
    if let Some(tx) = tx {
        match tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                METRICS.access_log_dropped.inc();
            }
        }
    }
}

/// What is known about a request when its response starts; finished (and
/// written) when the body ends. Only cheap clones are taken on the request
/// path; text is formatted when (and only if) a line is written.
#[derive(Debug)]
pub struct Record {
    pub start: Instant,
    /// Wall-clock time of `start`; `None`: worked out when a line is
    /// written or a span exported (a clock read saved on every other
    /// request).
    pub time: Option<SystemTime>,
    pub request_id: http::HeaderValue,
    pub remote_addr: std::net::IpAddr,
    pub method: http::Method,
    /// The request target as received (path and query); `None` when the
    /// request was refused before it was parsed (logged as `-`).
    pub uri: Option<http::Uri>,
    pub status: u16,
    pub route: Arc<str>,
    pub server: Option<Arc<str>>,
    pub trace_id: crate::observe::trace::TraceId,
    /// The span to export, when OTLP export is on and the trace sampled.
    #[cfg(feature = "otlp")]
    pub span: Option<crate::observe::otlp::SpanIds>,
    pub upstream_addr: Option<crate::proxy::pool::Endpoint>,
    pub upstream_status: Option<u16>,
    pub upstream_duration: Option<Duration>,
    pub auth: Option<&'static str>,
    pub rate_limit: Option<&'static str>,
    pub cache: Option<&'static str>,
    pub user_agent: Option<http::HeaderValue>,
    pub referer: Option<http::HeaderValue>,
    pub log: AccessLog,
    /// Counts the request in flight until the record is dropped, after
    /// its response ended (see [`crate::server::memory`]).
    pub in_flight: crate::server::memory::InFlight,
}

/// A route's metric handles on one thread: its duration histogram and a
/// request counter per (method label, status) seen.
struct RouteSeries {
    duration: prometheus_client::metrics::histogram::Histogram,
    requests: Vec<(
        &'static str,
        u16,
        prometheus_client::metrics::counter::Counter,
    )>,
}

thread_local! {
    /// Metric handles of this thread, so that counting a request takes no
    /// lock and allocates nothing once a (route, method, status) was seen:
    /// one lookup by the route's text (no clone), then a short scan.
    static SERIES: std::cell::RefCell<crate::FastMap<Arc<str>, RouteSeries>> =
        std::cell::RefCell::new(crate::FastMap::default());
}

/// The `method` label of a request: the standard methods (and `-`, a
/// request refused before it was parsed) as they are, any other `OTHER`:
/// clients choose extension methods freely, and each would otherwise add
/// a metric series for good.
fn metric_method(m: &http::Method) -> &'static str {
    use http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ if m.as_str() == "-" => "-",
        _ => "OTHER",
    }
}

impl Record {
    fn finish(&self, bytes: u64) {
        let elapsed = self.start.elapsed();
        let secs = elapsed.as_secs_f64();
        let method = metric_method(&self.method);
        let status = self.status;
        let count = |r: &mut RouteSeries| {
            r.duration.observe(secs);
            // `method` is one of a few statics: compared by address first.
            match r
                .requests
                .iter()
                .find(|(m, s, _)| *s == status && (std::ptr::eq(*m, method) || *m == method))
            {
                Some((_, _, c)) => {
                    c.inc();
                }
                None => {
                    let c = METRICS
                        .requests
                        .get_or_create(&RequestLabels {
                            route: self.route.to_string(),
                            method: method.to_string(),
                            status,
                        })
                        .clone();
                    c.inc();
                    r.requests.push((method, status, c));
                }
            }
        };
        SERIES.with(|s| {
            let mut s = s.borrow_mut();
            if let Some(r) = s.get_mut(&*self.route) {
                count(r);
            } else {
                let mut r = RouteSeries {
                    duration: METRICS
                        .duration
                        .get_or_create(&RouteLabels {
                            route: self.route.to_string(),
                        })
                        .clone(),
                    requests: Vec::new(),
                };
                count(&mut r);
                s.insert(self.route.clone(), r);
            }
        });
        let time = || self.time.unwrap_or_else(|| SystemTime::now() - elapsed);
        #[cfg(feature = "otlp")]
        if let Some(ids) = &self.span {
            let start = time();
            crate::observe::otlp::export(crate::observe::otlp::Span {
                trace_id: self.trace_id.to_string(),
                ids: ids.clone(),
                method: self.method.clone(),
                route: self.route.clone(),
                uri: self.uri.clone().unwrap_or_default(),
                status: self.status,
                upstream_addr: self.upstream_addr.as_ref().map(ToString::to_string),
                start,
                end: start + elapsed,
            });
        }
        let AccessLog::On { target, format } = &self.log else {
            return;
        };
        let line = match format {
            AccessLogFormat::Json => self.json(time(), bytes, elapsed),
            AccessLogFormat::Combined => self.combined(time(), bytes),
        };
        emit(target, line);
    }

    fn json(&self, time: SystemTime, bytes: u64, elapsed: Duration) -> String {
        let ms = |d: Duration| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        serde_json::json!({
            "time": httpdate_rfc3339(time),
            "request_id": crate::proxy::forward::header_text(&self.request_id),
            "remote_addr": self.remote_addr.to_string(),
            "method": self.method.as_str(),
            "path": self.uri.as_ref().map_or("-", |u| u.path()),
            "query": self.uri.as_ref().and_then(|u| u.query()).unwrap_or(""),
            "status": self.status,
            "bytes_sent": bytes,
            "duration_ms": ms(elapsed),
            "upstream_addr": self.upstream_addr.as_ref().map(ToString::to_string),
            "upstream_status": self.upstream_status,
            "upstream_duration_ms": self.upstream_duration.map(ms),
            "route": &*self.route,
            "server": self.server.as_deref().unwrap_or(""),
            "trace_id": self.trace_id,
            "policies": {"auth": self.auth, "rate_limit": self.rate_limit, "cache": self.cache},
        })
        .to_string()
    }

    fn combined(&self, time: SystemTime, bytes: u64) -> String {
        let text = |v: &Option<http::HeaderValue>| {
            v.as_ref()
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty())
                .unwrap_or("-")
                .to_string()
        };
        let request = match &self.uri {
            Some(u) => format!(
                "{} {} HTTP/1.1",
                self.method,
                u.path_and_query().map(|p| p.as_str()).unwrap_or("/")
            ),
            None => "-".to_string(),
        };
        format!(
            "{} - - [{}] \"{}\" {} {} \"{}\" \"{}\"",
            self.remote_addr,
            httpdate::fmt_http_date(time),
            request,
            self.status,
            bytes,
            text(&self.referer),
            text(&self.user_agent),
        )
    }
}

/// RFC 3339 UTC time with milliseconds.
pub fn httpdate_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// A response body that counts what it sends and writes the access log
/// line when it ends or is dropped.
pub struct LoggedBody<B> {
    inner: B,
    bytes: u64,
    record: Option<Record>,
}

impl<B> LoggedBody<B> {
    pub fn new(inner: B, record: Record) -> Self {
        LoggedBody {
            inner,
            bytes: 0,
            record: Some(record),
        }
    }

    fn done(&mut self) {
        // Finished where it is, then dropped there (taken out first, the
        // record, some 400 bytes, was copied).
        if let Some(r) = &self.record {
            r.finish(self.bytes);
        }
        self.record = None;
    }
}

impl<B> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        self.done();
    }
}

impl<B> HttpBody for LoggedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => self.done(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(httpdate_rfc3339(t), "2023-11-14T22:13:20.123Z");
    }
}

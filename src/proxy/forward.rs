//! The request path: route, then the location's handler — `return`,
//! `proxy_pass` (URI splice, forwarded headers, retries) or `aggregate`.
//!
//! Every error the gateway produces itself is the JSON body of LANGUAGE.md
//! §4 with the request id, and each failure maps to its status in
//! [`ProxyError::status`].

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proxy::body::RequestBody;
use crate::proxy::headers::Seen;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};

use crate::compile::normalize::normalize_path;
use crate::compile::router::Lookup;
use crate::config::model::{
    Handler, Location, LocationSettings, Modifier, ProxyPass, ProxyTarget, Return, Server, Var,
};
use crate::gateway::Gateway;
use crate::proxy::balance::{Outcome, PickContext, Tried};
use crate::proxy::vars::RequestVars;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = crate::proxy::body::Boxed;

/// What every request handler shares: the current snapshot. (Upstream
/// connections live per worker thread in [`crate::proxy::pool`].)
pub struct Shared {
    pub gateway: ArcSwap<Gateway>,
}

impl Shared {
    pub fn new(gateway: Gateway) -> Shared {
        Shared {
            gateway: ArcSwap::from_pointee(gateway),
        }
    }
}

/// The pool key and TLS config for one upstream connection: `endpoint`
/// is where to connect, `written` the server's `host:port` as written
/// (its host is the TLS server name when it is a DNS name); `now`, the
/// caller's clock reading for the request.
#[allow(clippy::too_many_arguments)]
pub fn pool_target<'a>(
    gw: &Gateway,
    settings: &LocationSettings,
    tls: bool,
    endpoint: crate::proxy::pool::Endpoint,
    written: &str,
    keepalive: usize,
    trust: &'a mut Option<Arc<crate::tls::UpstreamTrust>>,
    now: Instant,
) -> crate::proxy::pool::Target<'a> {
    let tls_key = if tls {
        let t = trust.insert(gw.tls.trust_for(settings));
        let connect_host = match &endpoint {
            crate::proxy::pool::Endpoint::Addr(a) => a.ip().to_string(),
            crate::proxy::pool::Endpoint::Name(h, _) => h.to_string(),
        };
        let name = crate::tls::upstream_server_name(&connect_host, written);
        Some((Arc::<str>::from(name), t.fingerprint))
    } else {
        None
    };
    crate::proxy::pool::Target {
        key: crate::proxy::pool::Key {
            endpoint,
            tls: tls_key,
        },
        connect_timeout: settings.proxy_connect_timeout,
        keepalive,
        tls_config: trust.as_ref().map(|t| &t.upstream),
        fresh: false,
        read_timeout: None,
        send_timeout: None,
        now,
        response_room: response_room(settings),
        raw_response: None,
    }
}

/// How many headers the pipeline may add to a location's responses: the
/// request id, `add_header`, the rate-limit headers, `Age` and
/// `X-Cache-Status`.
fn response_room(settings: &LocationSettings) -> usize {
    1 + settings.add_header.len()
        + if settings.rate_limits.is_empty() {
            0
        } else {
            4
        }
        + if settings.cache.is_some() { 2 } else { 0 }
}

/// Idle connections kept per server for `proxy_pass http://host:port`
/// targets (upstream blocks say `keepalive N`; the default there is 32 too).
pub const DEFAULT_KEEPALIVE: usize = 32;

/// The connection a request came in on.
///
/// Aligned to 8: in the request's future (see [`handle`]) a field of
/// alignment 4 was laid out after kilobytes of the pipeline's state, and
/// writing the future into its box copied all of that (uninitialised)
/// span to place it.
#[derive(Debug, Clone, Copy)]
#[repr(align(8))]
pub struct ConnInfo {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Gateway-side failures, each with its status.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("Bad request")]
    BadRequest,
    #[error("Not found")]
    NotFound,
    #[error("Request body too large")]
    BodyTooLarge,
    #[error("No upstream server available")]
    NoUpstream,
    #[error("Bad gateway")]
    BadGateway,
    #[error("Gateway timeout")]
    Timeout,
    #[error("Request timeout")]
    BodyTimeout,
    /// A pooled upstream connection closed under a bodyless idempotent
    /// request before any response: sent again on a new connection.
    #[error("Bad gateway")]
    Stale,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::NotFound => StatusCode::NOT_FOUND,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoUpstream => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadGateway | ProxyError::Stale => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Body::new(Full::new(b.into()).map_err(|never| match never {}))
}

fn empty() -> Body {
    Body::new(Empty::new().map_err(|never| match never {}))
}

/// `{"error": "...", "status": N, "request_id": "..."}`
pub fn error_response(
    status: StatusCode,
    message: &str,
    request_id: &str,
    id_header: &str,
) -> Response<Body> {
    let body =
        serde_json::json!({"error": message, "status": status.as_u16(), "request_id": request_id});
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let (Some(n), Ok(v)) = (
        request_id_name(id_header),
        HeaderValue::try_from(request_id),
    ) {
        resp.headers_mut().insert(n, v);
    }
    resp
}

/// A sane incoming id is kept (§4): ≤ 128 chars of `[A-Za-z0-9._:-]`.
fn sane_id(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    ok.then_some(s)
}

/// A new request id as a header value: no allocation of its own (see
/// [`crate::proxy::headers::made`]), and every clone (upstream request,
/// response, log) shares it.
pub fn new_request_id_value() -> HeaderValue {
    let x = fastrand::u128(..);
    let mut buf = [0u8; 32];
    buf[..16].copy_from_slice(&crate::observe::trace::hex16((x >> 64) as u64));
    buf[16..].copy_from_slice(&crate::observe::trace::hex16(x as u64));
    crate::proxy::headers::made::generated(&buf)
}

/// A header value as text (empty if it is not visible ASCII; request ids
/// and the hosts it is used for are checked to be).
pub fn header_text(v: &HeaderValue) -> &str {
    v.to_str().unwrap_or("")
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, and the proxy-auth pair).
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request-id header's name (`request_id_header`, `x-request-id` by
/// default) without parsing the common case.
pub fn request_id_name(configured: &str) -> Option<HeaderName> {
    if configured == "x-request-id" {
        Some(X_REQUEST_ID)
    } else {
        config_header_name(configured)
    }
}

thread_local! {
    /// Header names from the config, parsed once per worker thread.
    static CONFIG_NAMES: std::cell::RefCell<crate::FastMap<Box<str>, HeaderName>> =
        std::cell::RefCell::new(crate::FastMap::default());
}

/// A header name written in the config (`proxy_set_header`, `add_header`,
/// `forward_claims`, `request_id_header`): parsed the first time a worker
/// meets it, then a shared clone instead of a parse and an allocation per
/// request. Only config text reaches it, so the set is bounded; it is
/// emptied if reloads ever pile up more than 4,096 names.
pub fn config_header_name(name: &str) -> Option<HeaderName> {
    CONFIG_NAMES
        .try_with(|m| {
            let mut m = m.borrow_mut();
            if let Some(n) = m.get(name) {
                return Some(n.clone());
            }
            let n = HeaderName::try_from(name).ok()?;
            if m.len() >= 4096 {
                m.clear();
            }
            m.insert(name.into(), n.clone());
            Some(n)
        })
        .ok()
        .flatten()
}

/// An IP address as a header value: formatted on the stack, one
/// allocation, and its clones (X-Forwarded-For, X-Real-IP) share it.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    thread_local! {
        /// The last address formatted on this thread: a keep-alive
        /// connection's requests (and a busy client's) share one value.
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    if let Ok(Some(v)) = LAST.try_with(|l| {
        l.borrow()
            .as_ref()
            .filter(|(last, _)| *last == ip)
            .map(|(_, v)| v.clone())
    }) {
        return v;
    }
    let v = format_ip(ip);
    let _ = LAST.try_with(|l| *l.borrow_mut() = Some((ip, v.clone())));
    v
}

fn format_ip(ip: IpAddr) -> HeaderValue {
    struct IpText {
        buf: [u8; 46],
        len: usize,
    }
    impl AsRef<[u8]> for IpText {
        fn as_ref(&self) -> &[u8] {
            &self.buf[..self.len]
        }
    }
    let mut t = IpText {
        buf: [0u8; 46],
        len: 0,
    };
    match ip {
        // Four small numbers: `itoa`, not the formatting machinery (which
        // cost ~1,000 instructions per request here).
        IpAddr::V4(v4) => {
            let mut n = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    t.buf[t.len] = b'.';
                    t.len += 1;
                }
                let s = n.format(octet).as_bytes();
                t.buf[t.len..t.len + s.len()].copy_from_slice(s);
                t.len += s.len();
            }
        }
        IpAddr::V6(_) => {
            use std::io::Write;
            let mut cur = std::io::Cursor::new(&mut t.buf[..]);
            let _ = write!(cur, "{ip}");
            t.len = cur.position() as usize;
        }
    }
    HeaderValue::from_maybe_shared(Bytes::from_owner(t))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The header names a message's `Connection` headers list.
pub(crate) fn connection_listed(h: &HeaderMap) -> Vec<HeaderName> {
    // The usual options as static names: parsing `close` allocated a
    // custom name on every `Connection: close` request.
    const CLOSE: HeaderName = HeaderName::from_static("close");
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    super::headers::get_all(h, &header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| {
            let n = n.trim();
            if n.eq_ignore_ascii_case("close") {
                Some(CLOSE)
            } else if n.eq_ignore_ascii_case("keep-alive") {
                Some(KEEP_ALIVE)
            } else {
                HeaderName::try_from(n).ok()
            }
        })
        .collect()
}

/// Whether a message's `Connection` headers list `name` (what
/// `connection_listed(h).contains(name)` says, without collecting the
/// list: no allocation, and nothing at all when no header is asked about).
pub(crate) fn connection_lists(h: &HeaderMap, name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    super::headers::get_all(h, &header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(super::headers::items)
        .any(|t| t.eq_ignore_ascii_case(name))
}

/// A message's `Connection` options, looked at once for asking about many
/// names ([`Listed::contains`] is `connection_listed(h).contains(name)`).
pub(crate) enum Listed<'a> {
    /// No `Connection` header.
    Nothing,
    /// Only `close` and `keep-alive` (the usual): which of them.
    Usual { close: bool, keep_alive: bool },
    /// Anything else: each question scans the values.
    Scan(&'a HeaderMap),
}

impl<'a> Listed<'a> {
    pub(crate) fn of(h: &'a HeaderMap) -> Listed<'a> {
        if !super::headers::contains(h, &header::CONNECTION) {
            return Listed::Nothing;
        }
        let (mut close, mut keep_alive) = (false, false);
        let usual = super::headers::get_all(h, &header::CONNECTION).all(|v| {
            // A value that is not text lists nothing (`connection_listed`).
            let Ok(v) = v.to_str() else { return true };
            super::headers::items(v).all(|t| {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                    true
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                    true
                } else {
                    t.is_empty()
                }
            })
        });
        if usual {
            Listed::Usual { close, keep_alive }
        } else {
            Listed::Scan(h)
        }
    }

    pub(crate) fn contains(&self, name: &HeaderName) -> bool {
        match self {
            Listed::Nothing => false,
            Listed::Usual { close, keep_alive } => match name.as_str() {
                "close" => *close,
                "keep-alive" => *keep_alive,
                _ => false,
            },
            Listed::Scan(h) => connection_lists(h, name),
        }
    }
}

/// Remove hop-by-hop headers and those listed in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names first: most responses carry none, and a
    // removal hashes its name even when absent (nine hashes per response).
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        for n in connection_listed(h) {
            h.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

/// Whether `name`, in any case, is one of [`HOP_BY_HOP`] (for header
/// names not parsed into a [`HeaderName`]; most names differ in length
/// from all nine, which the comparison checks first).
pub(crate) fn hop_by_hop_name(name: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_str()))
}

/// Whether `name` is one of [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

/// Characters kept as-is when a decoded path is put back on the wire.
const PATH_SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'%');

fn encode_path(p: &str) -> String {
    percent_encoding::utf8_percent_encode(p, PATH_SET).to_string()
}

/// `$remote_addr`: the peer, or the real client behind trusted proxies
/// (NGINX `real_ip_recursive on`).
fn remote_addr(server: &Server, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let Some(hname) = &server.real_ip.header else {
        return peer;
    };
    let trusted = |ip: IpAddr| server.real_ip.trusted.iter().any(|c| c.contains(ip));
    if !trusted(peer) {
        return peer;
    }
    let mut addrs: Vec<IpAddr> = Vec::new();
    for v in headers.get_all(hname.as_str()) {
        for part in v.to_str().unwrap_or("").split(',') {
            if let Ok(ip) = part.trim().parse::<IpAddr>() {
                addrs.push(ip);
            }
        }
    }
    let mut result = peer;
    for ip in addrs.into_iter().rev() {
        result = ip;
        if !trusted(ip) {
            break;
        }
    }
    result
}

/// What the access log and metrics learn while a request is served.
struct Outcome_ {
    route: Option<Arc<str>>,
    server: Option<Arc<str>>,
    request_id: HeaderValue,
    remote_addr: IpAddr,
    log: crate::config::model::AccessLog,
    upstream: Option<UpstreamInfo>,
    auth: Option<&'static str>,
    rate_limit: Option<&'static str>,
    cache: Option<&'static str>,
}

/// The upstream exchange of a proxied request, for the access log.
#[derive(Debug, Clone, Default)]
pub struct UpstreamInfo {
    /// Formatted only when a log line or span is written.
    pub addr: Option<crate::proxy::pool::Endpoint>,
    pub status: Option<u16>,
    pub duration: Duration,
    /// The response's header lines, when they are passed through: handed
    /// on with the response ([`Answered`]).
    pub raw: Option<crate::proxy::client::RawHeaders>,
}

/// What [`handle`] answers: the response and, when it is an upstream's
/// whose header lines are passed through
/// ([`crate::proxy::client::RawHeaders`]), those lines, which the HTTP/1
/// writer writes before the response's map.
pub struct Answered {
    pub resp: Response<Body>,
    pub raw: Option<crate::proxy::client::RawHeaders>,
}

impl Answered {
    /// The response alone, the passed-through lines back in its map (for a
    /// writer that only knows the map).
    pub fn into_response(self) -> Response<Body> {
        let mut resp = self.resp;
        if let Some(raw) = self.raw {
            raw.restore(&mut resp);
        }
        resp
    }
}

thread_local! {
    /// The `route` label of requests no location matched.
    static NONE_ROUTE: Arc<str> = Arc::from("none");
}

/// Serve one request: route it, run its location, and log it when the
/// response body ends.
//
// Not an `async fn`: its arguments would sit in its state twice (the
// argument and its binding); the block captures them once. The whole of
// it in one box: the request's state is kilobytes, and a connection would
// otherwise keep a slot of that size while it waits for a head. The box
// comes first and the future is written into it: built in place, not
// built on the stack and copied (kilobytes, most of them unused yet). The
// pipeline is in the same block, not a future of its own awaited here
// (that future would be built and then moved into this one's state).
pub fn handle<'a>(
    shared: &'a Shared,
    conn: ConnInfo,
    slot: &'a mut Option<Request<RequestBody>>,
    guard: Option<&'a crate::server::guard::GuardHandle>,
) -> Pin<Box<impl std::future::Future<Output = Answered> + 'a>> {
    Box::into_pin(Box::write(Box::new_uninit(), async move {
        // The request, taken from the caller's slot here, in the box: moved
        // in as an argument it would be copied into the block and then the
        // block into the box. (Every caller fills the slot.)
        let Some(mut req) = slot.take() else {
            return Answered {
                resp: error_response(StatusCode::INTERNAL_SERVER_ERROR, "No request", "", ""),
                raw: None,
            };
        };
        let gw = shared.gateway.load_full();
        // Which of the names asked about below the request has (one pass).
        let mut seen = Seen::of(req.headers(), gw.request_id_name.as_ref());
        // The guard's own synthetic request, answered without a pipeline.
        if let Some(g) = &guard
            && seen.has(Seen::MARKER)
            && let Some(r) = crate::server::guard::refused(g, shared, conn, &req)
        {
            return Answered { resp: r, raw: None };
        }
        // Told whether the connection was upgraded, once that is known.
        let upgrade_guard = guard.filter(|_| {
            req.extensions()
                .get::<crate::server::h1::OnUpgrade>()
                .is_some()
        });
        let start = Instant::now();
        let in_flight = crate::server::memory::InFlight::begin();
        // Cheap clones (reference counts), formatted only if a line is written.
        let method = req.method().clone();
        // Only for a log line or an exported span.
        #[cfg(feature = "otlp")]
        let keep_uri = gw.logs_requests || crate::observe::otlp::enabled();
        #[cfg(not(feature = "otlp"))]
        let keep_uri = gw.logs_requests;
        let uri = keep_uri.then(|| req.uri().clone());
        let (user_agent, referer) = if gw.logs_client_headers {
            (
                req.headers().get(header::USER_AGENT).cloned(),
                req.headers().get(header::REFERER).cloned(),
            )
        } else {
            (None, None)
        };
        let trace = crate::observe::trace::TraceContext::from_header(
            seen.has(Seen::TRACEPARENT)
                .then(|| super::headers::get(req.headers(), &TRACEPARENT))
                .flatten()
                .and_then(|v| v.to_str().ok()),
        );
        let mut out = Outcome_ {
            route: None,
            server: None,
            request_id: HeaderValue::from_static(""),
            remote_addr: conn.peer.ip(),
            log: gw.config.defaults.access_log.clone(),
            upstream: None,
            auth: None,
            rate_limit: None,
            cache: None,
        };
        // Boxed: the pipeline's state is kilobytes, and hyper keeps a slot of
        // this future's size for every connection, idle or not.
        // The pipeline, in this block (see above): every answer leaves it
        // by `break 'serve`, to be logged below.
        let resp: Response<Body> = 'serve: {
            let default_id_header = gw.config.defaults.request_id_header.as_str();
            // The Host: exactly one on HTTP/1.1; the authority of an absolute-form
            // target wins over it (RFC 9112 §3.2.2, as NGINX), and is h2's host.
            let (first_host, host_count) = if seen.has(Seen::HOST) {
                let mut host_values = super::headers::get_all(req.headers(), &header::HOST);
                let first_host = host_values.next();
                let host_count = match (first_host, host_values.next()) {
                    (None, _) => 0,
                    (Some(_), None) => 1,
                    (Some(_), Some(_)) => 2,
                };
                (first_host, host_count)
            } else {
                (None, 0)
            };
            // A header value: the Host header's is shared with the request, not copied.
            let host_value: Option<HeaderValue> = match (req.uri().authority(), host_count) {
                (_, 2..) => None,
                (Some(a), _) => HeaderValue::try_from(a.as_str()).ok(),
                (None, 1) => first_host.filter(|h| h.to_str().is_ok()).cloned(),
                (None, _) => None,
            };
            out.request_id = gw
                .request_id_name
                .as_ref()
                .filter(|_| seen.has(Seen::REQUEST_ID))
                .and_then(|n| super::headers::get(req.headers(), n))
                .filter(|v| sane_id(v).is_some())
                .cloned()
                .unwrap_or_else(new_request_id_value);
            let bad = |id: &str| {
                let mut r = error_response(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    id,
                    default_id_header,
                );
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                r
            };
            if (seen.has(Seen::CONTENT_LENGTH) || seen.has(Seen::TRANSFER_ENCODING))
                && !framing_ok(req.headers())
            {
                break 'serve bad(header_text(&out.request_id));
            }
            if host_count > 1
                || (req.version() == http::Version::HTTP_11
                    && (host_count == 0 || host_value.is_none()))
            {
                break 'serve bad(header_text(&out.request_id));
            }
            let host_raw: &str = host_value.as_ref().map_or("", header_text);
            let Some(host) = host_only(host_raw) else {
                break 'serve bad(header_text(&out.request_id));
            };
            let Some(pq) = req.uri().path_and_query().cloned() else {
                break 'serve bad(header_text(&out.request_id));
            };
            let raw_path = pq.path();
            if !raw_path.starts_with('/') {
                break 'serve bad(header_text(&out.request_id));
            }
            let path = match normalize_path(raw_path) {
                Ok(p) => p,
                Err(_) => break 'serve bad(header_text(&out.request_id)),
            };
            let Some(si) = gw.router.select_server(conn.local, Some(&host)) else {
                break 'serve error_response(
                    StatusCode::NOT_FOUND,
                    "Not found",
                    header_text(&out.request_id),
                    default_id_header,
                );
            };
            let server = &gw.config.servers[si];
            out.server = gw.labels.get(si).map(|l| l.server.clone());
            out.log = server.settings.access_log.clone();
            // A server-level `return` answers before any location is matched
            // (NGINX's server rewrite phase).
            if let Some(r) = &server.server_return {
                let settings = &server.settings;
                if settings.request_id_header != default_id_header {
                    out.request_id = request_id(&req, settings);
                }
                let id = header_text(&out.request_id);
                let empty_caps: Vec<Option<String>> = Vec::new();
                let request_uri = pq.as_str().to_string();
                let vars = RequestVars {
                    remote_addr: remote_addr(server, conn.peer.ip(), req.headers()),
                    host: &host,
                    scheme: if conn.tls { "https" } else { "http" },
                    method: req.method().as_str(),
                    uri: &path,
                    request_uri: &request_uri,
                    args: pq.query().unwrap_or(""),
                    headers: req.headers(),
                    request_id: id,
                    server_name: "",
                    server_port: conn.local.port(),
                    captures: &empty_caps,
                    named: &[],
                    claims: None,
                };
                let mut resp = return_response(r, &vars);
                let status = resp.status();
                finish_response(
                    status,
                    &mut crate::proxy::headers::Added::Map(resp.headers_mut()),
                    settings,
                    &vars,
                    &out.request_id,
                );
                break 'serve resp;
            }
            let (li, captures, named) = match gw.router.lookup(si, &path) {
                Lookup::Found { location, captures } => {
                    let loc = &server.locations[location];
                    let mut caps = Vec::new();
                    let mut named = Vec::new();
                    if let Some(re) = &loc.regex {
                        for i in 0..captures.len() {
                            caps.push(captures.get(i).map(str::to_string));
                        }
                        for n in re.capture_names().flatten() {
                            if let Some(v) = captures.name(n) {
                                named.push((n.to_string(), v.to_string()));
                            }
                        }
                    }
                    (location, caps, named)
                }
                Lookup::RedirectSlash { location } => {
                    let loc = &server.locations[location];
                    out.route = gw
                        .labels
                        .get(si)
                        .and_then(|l| l.routes.get(location))
                        .cloned();
                    out.log = loc.settings.access_log.clone();
                    let settings = &loc.settings;
                    if settings.request_id_header != default_id_header {
                        out.request_id = request_id(&req, settings);
                    }
                    let id = header_text(&out.request_id);
                    let mut target = encode_path(&format!("{path}/"));
                    if let Some(q) = pq.query() {
                        target.push('?');
                        target.push_str(q);
                    }
                    let mut resp = error_response(
                        StatusCode::MOVED_PERMANENTLY,
                        "Moved permanently",
                        id,
                        &settings.request_id_header,
                    );
                    if let Ok(v) = HeaderValue::try_from(target) {
                        resp.headers_mut().insert(header::LOCATION, v);
                    }
                    break 'serve resp;
                }
                Lookup::NotFound => {
                    break 'serve error_response(
                        StatusCode::NOT_FOUND,
                        "Not found",
                        header_text(&out.request_id),
                        default_id_header,
                    );
                }
            };
            let loc = &server.locations[li];
            out.route = gw.labels.get(si).and_then(|l| l.routes.get(li)).cloned();
            out.log = loc.settings.access_log.clone();
            let settings = &loc.settings;
            if settings.request_id_header != default_id_header {
                out.request_id = request_id(&req, settings);
            }
            let id = header_text(&out.request_id);
            let remote = remote_addr(server, conn.peer.ip(), req.headers());
            out.remote_addr = remote;
            let server_name = server
                .names
                .iter()
                .find_map(|n| match n {
                    crate::config::model::ServerName::Exact(x) => Some(x.as_str()),
                    _ => None,
                })
                .unwrap_or("");
            let effective_host: &str = if host.is_empty() { server_name } else { &host };
            let request_uri = pq.as_str();
            let args = pq.query().unwrap_or("");
            let method = req.method().clone();
            // Authentication (§6): before anything else of the location runs.
            let claims = match settings.auth_jwt.and_then(|i| gw.jwt.get(i)) {
                None => None,
                Some(v) => {
                    match v.authenticate(req.headers(), args, std::time::SystemTime::now()) {
                        Ok(c) => {
                            out.auth = Some("ok");
                            // Claim headers are the gateway's: drop what the client sent.
                            let def = &gw.config.jwt[settings.auth_jwt.unwrap_or_default()];
                            for (claim, h) in &def.forward_claims {
                                req.headers_mut().remove(h.as_str());
                                if let (Some(val), Some(n)) = (c.get(claim), config_header_name(h))
                                    && let Ok(val) = HeaderValue::try_from(val)
                                {
                                    req.headers_mut().insert(n, val);
                                }
                            }
                            if !def.forward_claims.is_empty() {
                                // The names changed: learned again.
                                seen = Seen::of(req.headers(), gw.request_id_name.as_ref());
                            }
                            Some(c)
                        }
                        Err(r) => {
                            out.auth = Some(if r.is_invalid() { "invalid" } else { "missing" });
                            tracing::info!(policy = v.name(), reason = %r, request_id = %id, "authentication failed");
                            crate::observe::metrics::METRICS
                                .auth_failures
                                .get_or_create(&crate::observe::metrics::ReasonLabels {
                                    policy: v.name().to_string(),
                                    reason: format!("{r:?}")
                                        .split('(')
                                        .next()
                                        .unwrap_or("")
                                        .to_ascii_lowercase(),
                                })
                                .inc();
                            let mut resp = error_response(
                                r.status(),
                                r.message(),
                                id,
                                &settings.request_id_header,
                            );
                            resp.headers_mut().insert(
                                header::WWW_AUTHENTICATE,
                                crate::policy::jwt::www_authenticate(v.name(), r.is_invalid()),
                            );
                            break 'serve resp;
                        }
                    }
                }
            };
            // From here on the request is in parts: the variables borrow its
            // headers (no copy), the handler takes its body.
            let (mut parts, body) = req.into_parts();
            let mut extensions = std::mem::take(&mut parts.extensions);
            let vars = RequestVars {
                remote_addr: remote,
                host: effective_host,
                scheme: if conn.tls { "https" } else { "http" },
                method: method.as_str(),
                uri: &path,
                request_uri,
                args,
                headers: &parts.headers,
                request_id: id,
                server_name,
                server_port: conn.local.port(),
                captures: &captures,
                named: &named,
                claims: claims.as_deref(),
            };
            // Rate limits (§7): every limit of the location applies.
            let mut limit_headers: Option<crate::policy::rate_limit::Verdict> = None;
            if !settings.rate_limits.is_empty() {
                for &i in &settings.rate_limits {
                    let Some(lim) = gw.limiters.get(i) else {
                        continue;
                    };
                    // `$remote_addr` (the default key): the address as
                    // this thread last formatted it, not a new string.
                    let (ip, rendered);
                    let key = match lim.key().single_var() {
                        Some(Var::RemoteAddr) => {
                            ip = ip_value(vars.remote_addr);
                            ip.to_str().unwrap_or_default()
                        }
                        _ => {
                            rendered = vars.render(lim.key());
                            rendered.as_str()
                        }
                    };
                    // Counted at the request's arrival (a clock read fewer).
                    match lim.decide(key, start).await {
                        crate::policy::rate_limit::Decision::Counted(v) => {
                            if !v.allowed {
                                out.rate_limit = Some("limited");
                                crate::observe::metrics::METRICS
                                    .rate_limited
                                    .get_or_create(&crate::observe::metrics::LimitLabels {
                                        limit: lim.name().to_string(),
                                    })
                                    .inc();
                                let mut resp = error_response(
                                    StatusCode::TOO_MANY_REQUESTS,
                                    "Too many requests",
                                    id,
                                    &settings.request_id_header,
                                );
                                v.write_headers(resp.headers_mut());
                                break 'serve resp;
                            }
                            // The running choice: what reducing them all
                            // in order gives, without collecting them.
                            limit_headers = crate::policy::rate_limit::Verdict::most_restrictive(
                                limit_headers.take().into_iter().chain(Some(v)),
                            );
                        }
                        crate::policy::rate_limit::Decision::StoreError => {
                            tracing::warn!(limit = lim.name(), "rate limit store unavailable");
                            if !lim.on_store_error_allow() {
                                out.rate_limit = Some("store_error");
                                break 'serve error_response(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "Rate limit store unavailable",
                                    id,
                                    &settings.request_id_header,
                                );
                            }
                            out.rate_limit = Some("store_error_allowed");
                        }
                    }
                }
                if out.rate_limit.is_none() {
                    out.rate_limit = Some("allowed");
                }
            }
            let mut resp = match &loc.handler {
                Handler::Return(r) => return_response(r, &vars),
                Handler::Proxy(p) => {
                    let ctx = ProxyCtx {
                        gw: &gw,
                        loc,
                        vars: &vars,
                        host_raw,
                        host_value: host_value.as_ref(),
                        conn,
                        path: &path,
                        trace: &trace,
                        body_timeout: server.limits.body_timeout,
                        request_id: &out.request_id,
                        limit_headers: limit_headers.is_some(),
                        seen,
                    };
                    let cache = settings.cache.and_then(|i| gw.caches.get(i).cloned());
                    let resp = match cache {
                        Some(cache) if cache.def().methods.iter().any(|m| m == method.as_str()) => {
                            let key = vars.render(&cache.def().key);
                            // Built only on a miss (or a refresh): a fresh hit
                            // never prepares an upstream request.
                            let make_fetch = || {
                                let mut prep = prepare(&ctx, p, &parts);
                                // Validators and ranges are the client's business:
                                // the cache stores whole responses (as NGINX does).
                                for h in [
                                    header::IF_NONE_MATCH,
                                    header::IF_MODIFIED_SINCE,
                                    header::IF_RANGE,
                                    header::RANGE,
                                ] {
                                    prep.headers.retain(|(have, _)| *have != h);
                                    prep.skip.push(h);
                                }
                                cache_fetch(gw.clone(), si, li, prep.into_owned(), id.to_string())
                            };
                            let (status, resp) = cache.serve_with(key, &parts, make_fetch).await;
                            out.cache = Some(status.as_str());
                            resp
                        }
                        other => {
                            let mut resp = match proxy(
                                &ctx,
                                p,
                                &parts,
                                &mut extensions,
                                body,
                                &mut out.upstream,
                            )
                            .await
                            {
                                Ok(r) => r,
                                Err(e) => error_response(
                                    e.status(),
                                    &e.to_string(),
                                    id,
                                    &settings.request_id_header,
                                ),
                            };
                            if other.is_some() {
                                // A cached location, but a method its cache does not store.
                                resp.headers_mut().insert(
                                    crate::policy::cache::X_CACHE_STATUS,
                                    HeaderValue::from_static("BYPASS"),
                                );
                                out.cache = Some("BYPASS");
                            }
                            resp
                        }
                    };
                    if settings.wrap_response {
                        crate::policy::wrap::wrap(
                            resp,
                            settings.wrap_response_max_size,
                            id,
                            std::time::SystemTime::now(),
                        )
                        .await
                    } else {
                        resp
                    }
                }
                Handler::Aggregate(a) => {
                    crate::proxy::aggregate::run(&gw, a, &vars, settings, &parts.headers).await
                }
            };
            // Room for all that is added below: an upstream response's map was
            // made with it (`Target::response_room`); others (cached, local,
            // aggregated) grow once here, not once per insert that crosses
            // their capacity.
            //
            // Behind an upstream's passed-through lines instead, when they
            // are: written out with them, never in a map. They go back
            // where they were found, and on with the response below.
            let status = resp.status();
            let mut raw = out.upstream.as_mut().and_then(|u| u.raw.take());
            let mut added = match &mut raw {
                Some(lines) => crate::proxy::headers::Added::Lines(lines),
                None => {
                    resp.headers_mut().reserve(response_room(settings));
                    crate::proxy::headers::Added::Map(resp.headers_mut())
                }
            };
            finish_response(status, &mut added, settings, &vars, &out.request_id);
            if let Some(v) = limit_headers {
                v.write_to(&mut added);
            }
            if let (Some(lines), Some(u)) = (raw, out.upstream.as_mut()) {
                u.raw = Some(lines);
            }
            // The request's map, done with, for the next head on this thread.
            crate::proxy::headers::spare::give(std::mem::take(&mut parts.headers));
            resp
        };
        // An upstream's passed-through lines go with its response (set
        // only where the response is the upstream's, unchanged).
        let raw = out.upstream.as_mut().and_then(|u| u.raw.take());
        if let Some(g) = upgrade_guard {
            crate::server::guard::decided(g, resp.status());
        }
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        // The record is written into the body's box where it is made (it
        // is ~480 bytes: built first and then moved in, it was copied
        // twice).
        let logged = Box::write(
            Box::new_uninit(),
            crate::observe::access_log::LoggedBody::new(
                body,
                crate::observe::access_log::Record {
                    start,
                    time: None,
                    request_id: out.request_id,
                    remote_addr: out.remote_addr,
                    method,
                    uri,
                    status,
                    route: out.route.unwrap_or_else(|| NONE_ROUTE.with(Arc::clone)),
                    server: out.server,
                    #[cfg(feature = "otlp")]
                    span: crate::observe::otlp::SpanIds::of(&trace),
                    trace_id: trace.trace_id,
                    upstream_addr: out.upstream.as_ref().and_then(|u| u.addr.clone()),
                    upstream_status: out.upstream.as_ref().and_then(|u| u.status),
                    upstream_duration: out.upstream.as_ref().map(|u| u.duration),
                    auth: out.auth,
                    rate_limit: out.rate_limit,
                    cache: out.cache,
                    user_agent,
                    referer,
                    log: out.log,
                    in_flight,
                },
            ),
        );
        Answered {
            resp: Response::from_parts(parts, Body::from_box(logged)),
            raw,
        }
    }))
}

/// A response given without a parsed request (the guard's refusals):
/// logged and counted like any other, in the access log of the listener's
/// default server, under route `none` and method `-`, with no target.
pub fn logged_refusal(
    shared: &Shared,
    conn: ConnInfo,
    resp: Response<Body>,
    request_id: HeaderValue,
) -> Response<Body> {
    let gw = shared.gateway.load();
    let server = gw.router.select_server(conn.local, None);
    let record = crate::observe::access_log::Record {
        start: Instant::now(),
        time: None,
        request_id,
        remote_addr: conn.peer.ip(),
        method: Method::from_bytes(b"-").unwrap_or(Method::GET),
        uri: None,
        status: resp.status().as_u16(),
        route: NONE_ROUTE.with(Arc::clone),
        server: server
            .and_then(|si| gw.labels.get(si))
            .map(|l| l.server.clone()),
        #[cfg(feature = "otlp")]
        span: None,
        trace_id: crate::observe::trace::TraceContext::from_header(None).trace_id,
        upstream_addr: None,
        upstream_status: None,
        upstream_duration: None,
        auth: None,
        rate_limit: None,
        cache: None,
        user_agent: None,
        referer: None,
        log: server.and_then(|si| gw.config.servers.get(si)).map_or_else(
            || gw.config.defaults.access_log.clone(),
            |s| s.settings.access_log.clone(),
        ),
        in_flight: crate::server::memory::InFlight::begin(),
    };
    let (parts, body) = resp.into_parts();
    Response::from_parts(
        parts,
        Body::new(crate::observe::access_log::LoggedBody::new(body, record)),
    )
}

/// The upstream fetch of a cached location: owns what it needs, so the
/// cache can call it again (a waiter falling back, a background refresh
/// after the client was answered).
fn cache_fetch(
    gw: Arc<Gateway>,
    server: usize,
    location: usize,
    prep: Prepared<'static>,
    request_id: String,
) -> crate::policy::cache::Fetch {
    Arc::new(move || {
        let (gw, prep, id) = (gw.clone(), prep.clone(), request_id.clone());
        Box::pin(async move {
            let loc = &gw.config.servers[server].locations[location];
            let Handler::Proxy(p) = &loc.handler else {
                return Err(crate::policy::cache::FetchError::new(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                ));
            };
            let mut ext = http::Extensions::new();
            let mut info = None;
            let mut sent = prep.clone();
            let first = send(
                &gw,
                p,
                &loc.settings,
                &mut sent,
                None,
                &mut ext,
                &mut info,
                false,
            )
            .await;
            match first {
                Err(ProxyError::Stale) => {
                    let mut prep = prep;
                    send(
                        &gw,
                        p,
                        &loc.settings,
                        &mut prep,
                        None,
                        &mut ext,
                        &mut info,
                        true,
                    )
                    .await
                }
                r => r,
            }
            .map_err(|e| {
                crate::policy::cache::FetchError::new(e.status(), e.to_string()).with_request_id(id)
            })
        })
    })
}

/// Request framing that cannot be smuggled (RFC 9112 §6): at most one
/// `Content-Length`, no `Content-Length` with `Transfer-Encoding`, and a
/// `Transfer-Encoding` that is exactly `chunked` on one line. Anything
/// else is a 400 and the connection is closed.
fn framing_ok(h: &HeaderMap) -> bool {
    use super::headers::get_all;
    let (cl, first_te, te_count) = if h.len() > super::headers::SCAN_UP_TO {
        let mut te = get_all(h, &header::TRANSFER_ENCODING);
        let (first_te, more_te) = (te.next(), te.next().is_some());
        (
            get_all(h, &header::CONTENT_LENGTH).count(),
            first_te,
            usize::from(first_te.is_some()) + usize::from(more_te),
        )
    } else {
        // A few fields: one pass over them, not one per name.
        let (mut cl, mut first_te, mut te_count) = (0, None, 0);
        for (n, v) in h {
            if n == header::CONTENT_LENGTH {
                cl += 1;
            } else if n == header::TRANSFER_ENCODING {
                first_te = first_te.or(Some(v));
                te_count += 1;
            }
        }
        (cl, first_te, te_count)
    };
    if cl > 1 || (cl == 1 && te_count > 0) || te_count > 1 {
        return false;
    }
    match first_te {
        None => true,
        Some(v) => v
            .to_str()
            .is_ok_and(|s| s.trim().eq_ignore_ascii_case("chunked")),
    }
}

/// The host of a `Host` value without its port, lowercased, trailing dots
/// trimmed; `None` when it is not a plausible host (RFC 3986 reg-name or
/// IP literal characters only).
fn host_only(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    // Per byte: 0 not allowed in a host, 1 allowed, 2 an uppercase letter
    // (allowed; the host is then lowercased).
    const CLASS: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut i = 0;
        while i < 256 {
            let b = i as u8;
            t[i] = if b.is_ascii_uppercase() {
                2
            } else if b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
            {
                1
            } else {
                0
            };
            i += 1;
        }
        t
    };
    let b = raw.as_bytes();
    let h: &[u8] = if b.first() == Some(&b'[') {
        let end = b.iter().position(|&c| c == b']')?;
        &b[..=end]
    } else {
        match b.iter().rposition(|&c| c == b':') {
            Some(i) if b[i + 1..].iter().all(u8::is_ascii_digit) => &b[..i],
            Some(_) => return None,
            None => b,
        }
    };
    let mut seen = 0u8;
    for &c in h {
        let k = CLASS[c as usize];
        if k == 0 {
            return None;
        }
        seen |= k;
    }
    // Only ASCII was let through: `h` ends on a character boundary.
    let h = raw.get(..h.len())?.trim_end_matches('.');
    Some(if seen & 2 != 0 {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    })
}

/// The request id under a location's own `request_id_header`.
fn request_id<B>(req: &Request<B>, settings: &LocationSettings) -> HeaderValue {
    req.headers()
        .get(settings.request_id_header.as_str())
        .filter(|v| sane_id(v).is_some())
        .cloned()
        .unwrap_or_else(new_request_id_value)
}

/// A header directive's value for this request: the one built at load
/// when it has no variables, else rendered; `None` when it is empty (the
/// directives then skip or remove the header), an error when the rendered
/// text cannot be a header value.
fn built_value(
    vars: &RequestVars<'_>,
    value: &crate::config::model::Template,
    built: &crate::config::model::HeaderBuilt,
) -> Option<Result<HeaderValue, InvalidValue>> {
    if let Some(v) = &built.value {
        return Some(Ok(v.clone()));
    }
    // Rendered into the thread's scratch text (no allocation and free per
    // value), then cut from the thread's block of made values: a value of
    // a rendered `String` itself would take a second allocation (its
    // capacity is rarely its length).
    let made = |v: &str| {
        (!v.is_empty())
            .then(|| crate::proxy::headers::made::value(v.as_bytes()).ok_or(InvalidValue))
    };
    RENDERED
        .try_with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            vars.render_to(value, &mut scratch);
            let v = made(&scratch);
            if scratch.capacity() > SCRATCH_KEPT {
                *scratch = String::new();
            }
            v
        })
        .unwrap_or_else(|_| made(&vars.render(value)))
}

thread_local! {
    /// [`built_value`]'s scratch text.
    static RENDERED: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}
/// A scratch text grown past this (a long claim) is let go after its use.
const SCRATCH_KEPT: usize = 1024;

/// A rendered header value that is not a valid one (a control character
/// from a variable): the header is left out.
#[derive(Debug)]
struct InvalidValue;

/// Response headers every answer of a location gets: `add_header`, the
/// request id.
fn finish_response(
    status: StatusCode,
    out: &mut crate::proxy::headers::Added<'_>,
    settings: &LocationSettings,
    vars: &RequestVars<'_>,
    id: &HeaderValue,
) {
    let ok_status = (200..400).contains(&status.as_u16());
    for h in &settings.add_header {
        if (h.always || ok_status)
            && let (Some(n), Some(Ok(v))) = (&h.built.name, built_value(vars, &h.value, &h.built))
        {
            out.append(n, v);
        }
    }
    if let Some(n) = request_id_name(&settings.request_id_header) {
        out.insert(&n, id);
    }
}

fn return_response(r: &Return, vars: &RequestVars<'_>) -> Response<Body> {
    match r {
        Return::Text { code, text } => {
            let body = text.as_ref().map(|t| vars.render(t)).unwrap_or_default();
            let mut resp = Response::new(if body.is_empty() { empty() } else { full(body) });
            *resp.status_mut() = StatusCode::from_u16(*code).unwrap_or(StatusCode::OK);
            if text.is_some() {
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
            }
            resp
        }
        Return::Redirect { code, url } => {
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::from_u16(*code).unwrap_or(StatusCode::FOUND);
            if let Ok(v) = HeaderValue::try_from(vars.render(url)) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
    }
}

struct ProxyCtx<'a> {
    gw: &'a Gateway,
    loc: &'a Location,
    vars: &'a RequestVars<'a>,
    host_raw: &'a str,
    /// The value `host_raw` is the text of, when there is one.
    host_value: Option<&'a HeaderValue>,
    conn: ConnInfo,
    path: &'a str,
    trace: &'a crate::observe::trace::TraceContext,
    body_timeout: Duration,
    request_id: &'a HeaderValue,
    /// The rate-limit headers will be set on the response.
    limit_headers: bool,
    /// Which names the request's map may hold.
    seen: Seen,
}

/// The path and query sent upstream (LANGUAGE.md §4, §13.3).
fn upstream_target(ctx: &ProxyCtx<'_>, p: &ProxyPass) -> String {
    let vars = ctx.vars;
    let query = |s: &mut String| {
        if !vars.args.is_empty() {
            s.push('?');
            s.push_str(vars.args);
        }
    };
    // Rewrites, in order; `break` stops.
    let mut rewritten: Option<String> = None;
    for rw in &ctx.loc.rewrites {
        let current = rewritten.clone().unwrap_or_else(|| ctx.path.to_string());
        if let Some(caps) = rw.regex.captures(&current) {
            let c: Vec<Option<String>> = (0..caps.len())
                .map(|i| caps.get(i).map(|m| m.as_str().to_string()))
                .collect();
            let named: Vec<(String, String)> = rw
                .regex
                .capture_names()
                .flatten()
                .filter_map(|n| {
                    caps.name(n)
                        .map(|m| (n.to_string(), m.as_str().to_string()))
                })
                .chain(vars.named.iter().cloned())
                .collect();
            let v = RequestVars {
                captures: &c,
                named: &named,
                ..*vars
            };
            let mut out = v.render(&rw.replacement);
            // A replacement with its own query keeps it (NGINX appends the
            // original args after it).
            if !out.starts_with('/') {
                out.insert(0, '/');
            }
            rewritten = Some(out);
            if rw.brk {
                break;
            }
        }
    }
    if let Some(r) = rewritten {
        let (path, q) = match r.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (r, None),
        };
        let mut s = encode_path(&path);
        match q {
            Some(q) => {
                s.push('?');
                s.push_str(&q);
                if !vars.args.is_empty() {
                    s.push('&');
                    s.push_str(vars.args);
                }
            }
            None => query(&mut s),
        }
        return s;
    }
    match &p.uri {
        None => vars.request_uri.to_string(),
        Some(t) if t.has_vars() => {
            let s = vars.render(t);
            if s.starts_with('/') {
                s
            } else {
                format!("/{s}")
            }
        }
        Some(t) => {
            // The common `proxy_pass http://up/prefix/;`: one allocation,
            // sized for the result (escaping the pieces one after the other
            // is escaping them joined).
            let rest = match ctx.loc.modifier {
                Modifier::Prefix | Modifier::PrefixNoRegex => {
                    ctx.path.get(ctx.loc.pattern.len()..).unwrap_or("")
                }
                _ => "",
            };
            let query_len = if vars.args.is_empty() {
                0
            } else {
                1 + vars.args.len()
            };
            let mut s = String::new();
            let lits = t.pieces.iter().filter_map(|p| match p {
                crate::config::model::Piece::Lit(l) => Some(l.as_str()),
                _ => None,
            });
            s.reserve_exact(lits.clone().map(str::len).sum::<usize>() + rest.len() + query_len);
            for piece in lits.chain(std::iter::once(rest)) {
                s.extend(percent_encoding::utf8_percent_encode(piece, PATH_SET));
            }
            query(&mut s);
            s
        }
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

async fn proxy(
    ctx: &ProxyCtx<'_>,
    p: &ProxyPass,
    parts: &http::request::Parts,
    extensions: &mut http::Extensions,
    body: RequestBody,
    info: &mut Option<UpstreamInfo>,
) -> Result<Response<Body>, ProxyError> {
    let settings = &ctx.loc.settings;
    // Body size: refuse up front when announced, cut when streamed.
    let limit = settings.client_max_body_size;
    let content_length: Option<u64> = ctx
        .seen
        .has(Seen::CONTENT_LENGTH)
        .then(|| super::headers::get(&parts.headers, &header::CONTENT_LENGTH))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if limit > 0 && content_length.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge);
    }
    let chunked = ctx.seen.has(Seen::TRANSFER_ENCODING)
        && super::headers::contains(&parts.headers, &header::TRANSFER_ENCODING);
    let has_body = chunked || content_length.is_some_and(|n| n > 0);
    let body: Option<Body> = if has_body {
        let b = crate::proxy::body::ClientBody::start(body, limit, ctx.body_timeout)
            .await
            .map_err(|e| match e {
                crate::proxy::body::BodyError::TooLarge => ProxyError::BodyTooLarge,
                crate::proxy::body::BodyError::Timeout => ProxyError::BodyTimeout,
                crate::proxy::body::BodyError::Malformed(_) => ProxyError::BadRequest,
            })?;
        Some(b.boxed())
    } else {
        None
    };
    let mut prep = prepare(ctx, p, parts);
    match send(
        ctx.gw,
        p,
        &ctx.loc.settings,
        &mut prep,
        body,
        extensions,
        info,
        false,
    )
    .await
    {
        // The request was bodyless (a stale error is only reported then):
        // prepare it again and send it on a new connection.
        Err(ProxyError::Stale) => {
            prep = prepare(ctx, p, parts);
            send(
                ctx.gw,
                p,
                &ctx.loc.settings,
                &mut prep,
                None,
                extensions,
                info,
                true,
            )
            .await
        }
        r => r,
    }
}

/// Everything about the upstream request that does not depend on which
/// server is picked: computed once, reused by every try (and, for cached
/// locations, by background refreshes).
#[derive(Clone)]
pub struct Prepared<'a> {
    pub method: http::Method,
    /// Path and query sent upstream (`None`: not a valid URI, a 400).
    pub target: Option<Uri>,
    /// The gateway's own headers (forwarding, trace, request id,
    /// `proxy_set_header`); they replace the client's of the same name.
    /// A list with distinct names ([`set_own`]), not a map: built and
    /// written once, never looked up by hashing.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The client's headers, passed on filtered as they are written
    /// ([`crate::proxy::client::Passthrough`]): borrowed while the client's
    /// request is alive, owned for a cache's later fetches.
    pub client: std::borrow::Cow<'a, HeaderMap>,
    /// Which names `client` may hold.
    pub seen: Seen,
    /// Client headers dropped besides those the filter always drops
    /// (`proxy_set_header NAME ""`, a cache's validators).
    pub skip: Vec<HeaderName>,
    pub host_override: Option<String>,
    pub hash_key: Option<String>,
    pub client_ip: IpAddr,
    pub upgrade: Option<HeaderValue>,
    /// The response's header lines go to the client as they came
    /// ([`crate::proxy::client::RawHeaders`]): the client speaks HTTP/1
    /// and nothing on the way reads the upstream's headers.
    pub raw_response: Option<RawResponse>,
}

/// How a passed-through response head is filtered (see
/// [`Prepared::raw_response`]).
#[derive(Clone, Copy, Debug)]
pub struct RawResponse {
    /// The pipeline sets the rate-limit headers: the upstream's are dropped.
    pub limit_headers: bool,
}

impl Prepared<'_> {
    /// For a fetch that may outlive the client's request.
    pub fn into_owned(self) -> Prepared<'static> {
        Prepared {
            method: self.method,
            target: self.target,
            headers: self.headers,
            client: std::borrow::Cow::Owned(self.client.into_owned()),
            seen: self.seen,
            skip: self.skip,
            host_override: self.host_override,
            hash_key: self.hash_key,
            client_ip: self.client_ip,
            upgrade: self.upgrade,
            // A fetch for a cache: the cache reads and stores the headers.
            raw_response: None,
        }
    }
}

fn prepare<'a>(ctx: &ProxyCtx<'_>, p: &ProxyPass, parts: &'a http::request::Parts) -> Prepared<'a> {
    let settings = &ctx.loc.settings;
    // No rewrite and no URI part: the client's own origin-form target goes
    // up as it came (the same bytes, no copy and no second parse).
    let target = if ctx.loc.rewrites.is_empty()
        && p.uri.is_none()
        && parts.uri.scheme().is_none()
        && parts.uri.authority().is_none()
    {
        Some(parts.uri.clone())
    } else {
        Uri::from_maybe_shared(Bytes::from(upstream_target(ctx, p))).ok()
    };
    // Only the gateway's own: the client's are written from its map.
    let mut headers = super::headers::spare::take_list(8 + settings.proxy_set_header.len());
    let mut skip = Vec::new();
    // Only with both `Connection` (listing `upgrade`) and `Upgrade`.
    let upgrade = if ctx.seen.has(Seen::CONNECTION) && ctx.seen.has(Seen::UPGRADE) {
        upgrade_protocol(&parts.headers)
    } else {
        None
    };
    if let Some(proto) = &upgrade {
        // A protocol upgrade (WebSocket) is the one hop-by-hop exchange that
        // must cross: it is re-added and the tunnel set up on 101.
        headers.push((header::CONNECTION, HeaderValue::from_static("upgrade")));
        headers.push((header::UPGRADE, proto.clone()));
    }
    let peer_ip = ctx.conn.peer.ip();
    let peer_value = ip_value(peer_ip);
    // The client's, unless its `Connection` made it hop-by-hop.
    let client_xff = ctx
        .seen
        .has(Seen::X_FORWARDED_FOR)
        .then(|| super::headers::get(&parts.headers, &X_FORWARDED_FOR))
        .flatten()
        .filter(|_| !connection_lists(&parts.headers, &X_FORWARDED_FOR));
    let xff = match client_xff.and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer_value.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer_value.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        _ => Some(peer_value.clone()),
    };
    if let Some(xff) = xff {
        headers.push((X_FORWARDED_FOR, xff));
    }
    headers.push((
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if ctx.conn.tls { "https" } else { "http" }),
    ));
    // The value `host_raw` is the text of (the client's `Host`, shared).
    let host_value = match ctx.host_value {
        Some(h) => Some(h.clone()),
        None => HeaderValue::try_from(ctx.host_raw).ok(),
    };
    if let Some(h) = host_value {
        headers.push((X_FORWARDED_HOST, h));
    }
    headers.push((
        X_REAL_IP,
        if ctx.vars.remote_addr == peer_ip {
            peer_value
        } else {
            ip_value(ctx.vars.remote_addr)
        },
    ));
    headers.push((TRACEPARENT, ctx.trace.header_value()));
    // From here on a name may repeat one above: set, not push.
    if let Some(n) = request_id_name(&settings.request_id_header) {
        if n == X_REQUEST_ID {
            // The default name is none of those above: added, not looked for.
            headers.push((n, ctx.request_id.clone()));
        } else {
            set_own(&mut headers, n, ctx.request_id.clone());
        }
    }
    let mut host_override: Option<String> = None;
    for h in &settings.proxy_set_header {
        if h.name == "host" {
            host_override = Some(ctx.vars.render(&h.value));
            continue;
        }
        let Some(n) = h.built.name.clone() else {
            continue;
        };
        match built_value(ctx.vars, &h.value, &h.built) {
            None => {
                headers.retain(|(have, _)| *have != n);
                skip.push(n);
            }
            Some(Ok(v)) => set_own(&mut headers, n, v),
            Some(Err(_)) => {}
        }
    }
    let hash_key = match &p.target {
        ProxyTarget::Upstream(i) => match ctx.gw.upstreams.get(*i).map(|u| &u.def.balance) {
            Some(crate::config::model::Balance::Hash { key, .. }) => Some(ctx.vars.render(key)),
            _ => None,
        },
        ProxyTarget::Address { .. } => None,
    };
    Prepared {
        method: parts.method.clone(),
        target,
        headers,
        client: std::borrow::Cow::Borrowed(&parts.headers),
        seen: ctx.seen,
        skip,
        host_override,
        hash_key,
        client_ip: ctx.vars.remote_addr,
        // What reads an upstream response's headers on the way: a cache,
        // `wrap`, an upgrade, and HTTP/2's writer (which writes a map).
        raw_response: (parts.version < http::Version::HTTP_2
            && upgrade.is_none()
            && settings.cache.is_none()
            && !settings.wrap_response)
            .then_some(RawResponse {
                limit_headers: ctx.limit_headers,
            }),
        upgrade,
    }
}

/// Set `name` in the gateway's own header list: replaces a value of the
/// same name (`HeaderMap::insert`), else adds it.
fn set_own(headers: &mut Vec<(HeaderName, HeaderValue)>, name: HeaderName, value: HeaderValue) {
    match headers.iter().position(|(have, _)| *have == name) {
        Some(i) => {
            headers[i].1 = value;
            // `insert` leaves one value; so does this.
            let mut j = i + 1;
            while j < headers.len() {
                if headers[j].0 == name {
                    headers.remove(j);
                } else {
                    j += 1;
                }
            }
        }
        None => headers.push((name, value)),
    }
}

/// The gateway's header list of a request being sent; given back to the
/// thread's spares however the sending ends.
struct SpareList(super::headers::spare::List);

impl Drop for SpareList {
    fn drop(&mut self) {
        super::headers::spare::give_list(std::mem::take(&mut self.0));
    }
}

/// Send a prepared request, trying servers per `proxy_next_upstream`.
#[allow(clippy::too_many_arguments)]
async fn send(
    gw: &Gateway,
    p: &ProxyPass,
    settings: &LocationSettings,
    // Borrowed, not moved in: an async fn's by-value argument sits in its
    // state twice (the argument and the binding), and is copied in.
    prep: &mut Prepared<'_>,
    mut body: Option<Body>,
    extensions: &mut http::Extensions,
    info: &mut Option<UpstreamInfo>,
    fresh: bool,
) -> Result<Response<Body>, ProxyError> {
    // Every try sends this list with its own `Host` behind it (pushed,
    // then taken off): no copy per try; back to the spares at the end.
    let mut headers = SpareList(std::mem::take(&mut prep.headers));
    let host_override = &prep.host_override;
    let upgrade = &prep.upgrade;
    let read_timeout = settings.proxy_read_timeout;
    let next = settings.proxy_next_upstream;
    let can_resend = idempotent(&prep.method) || next.non_idempotent;
    // The names the pipeline sets on the response itself: the upstream's
    // of these are dropped from passed-through lines (a map's `insert`
    // replaced them).
    let own_names: [&str; 4] = [
        settings.request_id_header.as_str(),
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
    ];
    let raw_filter = prep.raw_response.map(|r| crate::proxy::client::RawFilter {
        hide: &settings.proxy_hide_header,
        own: if r.limit_headers {
            &own_names[..]
        } else {
            &own_names[..1]
        },
    });

    // The peers to try.
    let pool = match &p.target {
        ProxyTarget::Upstream(i) => gw.upstreams.get(*i).cloned(),
        ProxyTarget::Address { .. } => None,
    };
    let keepalive = pool.as_ref().map_or(DEFAULT_KEEPALIVE, |p| p.def.keepalive);
    let Some(target) = prep.target.take() else {
        return Err(ProxyError::BadRequest);
    };
    let mut target = Some(target);
    let max_tries = match &pool {
        Some(pool) => {
            let n = pool.peers.len().max(1);
            match settings.proxy_next_upstream_tries {
                0 => n,
                t => (t as usize).min(n),
            }
        }
        None => 1,
    };
    let mut tried = Tried::new();
    let mut last_err = ProxyError::NoUpstream;
    let hash_key_bytes: Option<&[u8]> = prep.hash_key.as_deref().map(str::as_bytes);
    let written_address = match &p.target {
        ProxyTarget::Address { host, port } => format!("{host}:{port}"),
        ProxyTarget::Upstream(_) => String::new(),
    };
    for attempt in 0..max_tries {
        // One clock read for the pick and the upstream time (what lies
        // between them is no I/O); one more when the answer is in.
        let sent_at = Instant::now();
        let (endpoint, host_header, pick, host_value) = match &pool {
            Some(pool) => {
                let mut pc = PickContext::new(sent_at)
                    .client_ip(prep.client_ip)
                    .tried(&tried);
                if let Some(k) = hash_key_bytes {
                    pc = pc.hash_key(k);
                }
                let Some(pick) = pool.peers.pick(&pc) else {
                    if attempt == 0 {
                        return Err(ProxyError::NoUpstream);
                    }
                    break;
                };
                let i = pick.peer();
                let Some(addr) = pool.addr(i) else {
                    return Err(ProxyError::NoUpstream);
                };
                (
                    crate::proxy::pool::Endpoint::Addr(addr),
                    pool.hosts[i].as_str(),
                    Some(pick),
                    pool.host_values[i].clone(),
                )
            }
            None => match &p.target {
                ProxyTarget::Address { host, port } => (
                    crate::proxy::pool::Endpoint::Name(Arc::from(host.as_str()), *port),
                    written_address.as_str(),
                    None,
                    HeaderValue::try_from(written_address.as_str()).ok(),
                ),
                ProxyTarget::Upstream(_) => return Err(ProxyError::NoUpstream),
            },
        };
        if let Some(pk) = &pick {
            tried.insert(pk.peer());
        }
        let mut trust = None;
        let mut conn_target = pool_target(
            gw,
            settings,
            p.tls,
            endpoint,
            host_header,
            keepalive,
            &mut trust,
            sent_at,
        );
        conn_target.fresh = fresh;
        conn_target.raw_response = raw_filter;
        conn_target.read_timeout = Some(read_timeout);
        conn_target.send_timeout = Some(settings.proxy_send_timeout);
        let own = &mut headers.0;
        let ours = own.len();
        let host_value = match host_override {
            Some(o) => HeaderValue::try_from(o.as_str()).ok(),
            None => host_value,
        };
        if let Some(v) = host_value {
            own.push((header::HOST, v));
        }
        let sent_body = body.take();
        let had_body = sent_body.is_some();
        // The request's own map stays empty (no allocation): the gateway's
        // headers go as the list, the client's from its map.
        let mut up_req = Request::new(()).into_parts().0;
        up_req.method = prep.method.clone();
        // The last possible try takes the target; earlier ones clone it (a
        // rewritten target's first clone allocates: its bytes were a
        // `String`'s).
        let uri = if attempt + 1 < max_tries {
            target.clone()
        } else {
            target.take()
        };
        super::over_default(&mut up_req.uri, uri.ok_or(ProxyError::BadRequest)?);
        let result = crate::proxy::pool::request(
            &conn_target,
            &up_req,
            sent_body.unwrap_or_else(empty),
            Some(crate::proxy::client::Passthrough {
                headers: &prep.client,
                seen: prep.seen,
                skip: &prep.skip,
                own,
            }),
        )
        .await;
        own.truncate(ours);
        let authority = &conn_target.key.endpoint;
        let duration = sent_at.elapsed();
        let answered_at = sent_at + duration;
        *info = Some(UpstreamInfo {
            addr: Some(authority.clone()),
            status: match &result {
                Ok(r) => Some(r.status().as_u16()),
                _ => None,
            },
            duration,
            raw: None,
        });
        if let (Some(pool), Some(pk)) = (&pool, &pick) {
            crate::observe::metrics::count_upstream(
                &pool.name,
                &pool.hosts[pk.peer()],
                info.as_ref().and_then(|i| i.status).unwrap_or(0),
            );
        }
        let report = |o: Outcome| {
            if let (Some(pool), Some(pk)) = (&pool, &pick) {
                pool.peers.report(pk.peer(), o, answered_at);
            }
        };
        let retry_allowed = !had_body && upgrade.is_none() && attempt + 1 < max_tries;
        match result {
            Err(e) if e.is_timeout() => {
                report(Outcome::Failure);
                tracing::warn!(upstream = %authority, "upstream timed out");
                last_err = ProxyError::Timeout;
                if next.timeout && retry_allowed && can_resend {
                    continue;
                }
                break;
            }
            Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS && upgrade.is_some() => {
                report(Outcome::Success);
                let client_side = extensions.remove::<crate::server::h1::OnUpgrade>();
                let (mut rparts, upstream_body) = resp.into_parts();
                if let (Some(client_side), Some(upstream_side)) =
                    (client_side, upstream_body.into_upgraded())
                {
                    tokio::spawn(tunnel(client_side, upstream_side));
                }
                let keep_upgrade = rparts.headers.get(header::UPGRADE).cloned();
                strip_hop_by_hop(&mut rparts.headers);
                rparts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                if let Some(u) = keep_upgrade {
                    rparts.headers.insert(header::UPGRADE, u);
                }
                return Ok(Response::from_parts(rparts, empty()));
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_status = (status == 502 && next.http_502)
                    || (status == 503 && next.http_503)
                    || (status == 504 && next.http_504);
                if retry_status {
                    report(Outcome::Failure);
                    if retry_allowed && can_resend {
                        continue;
                    }
                } else {
                    report(Outcome::Success);
                }
                let (resp, raw) = upstream_response(resp, settings);
                if let Some(i) = info.as_mut() {
                    i.raw = raw;
                }
                return Ok(resp);
            }
            Err(e) if e.is_stale() && !had_body && idempotent(&prep.method) => {
                // Not the upstream's failure: its keep-alive ended as the
                // request went out. The caller sends it again, fresh.
                tracing::debug!(upstream = %authority, "pooled connection closed under a request; sending again");
                return Err(ProxyError::Stale);
            }
            Err(e) => {
                // The client's body failing is the client's fault, not the
                // upstream's: answer for it and leave the peer's health alone.
                if let Some(be) = crate::proxy::body::body_error_in(&e) {
                    return Err(match be {
                        crate::proxy::body::BodyError::TooLarge => ProxyError::BodyTooLarge,
                        crate::proxy::body::BodyError::Timeout => ProxyError::BodyTimeout,
                        crate::proxy::body::BodyError::Malformed(_) => ProxyError::BadRequest,
                    });
                }
                report(Outcome::Failure);
                let connect = e.is_connect();
                tracing::warn!(upstream = %authority, error = %error_chain(&e), "upstream request failed");
                last_err = ProxyError::BadGateway;
                // A connect error means nothing was sent: always safe to retry.
                if next.error && retry_allowed && (connect || can_resend) {
                    continue;
                }
                break;
            }
        }
    }
    Err(last_err)
}

/// The `Upgrade` protocol of a request that asks for one (`Connection:
/// upgrade` and an `Upgrade` header), HTTP/1.1 only.
fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let asks = super::headers::get_all(h, &header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(super::headers::items)
        .any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    if asks {
        super::headers::get(h, &header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Copy bytes both ways between the upgraded client and upstream
/// connections until either side closes.
async fn tunnel(client: crate::server::h1::OnUpgrade, mut u: crate::proxy::client::Conn) {
    let mut c = match client.upgraded().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "client upgrade failed");
            return;
        }
    };
    // Bytes the client sent right behind its head go first.
    let r = match tokio::io::AsyncWriteExt::write_all(&mut u, &c.read).await {
        Ok(()) => tokio::io::copy_bidirectional(&mut c.io, &mut u).await,
        Err(e) => Err(e),
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "tunnel closed with an error");
    }
}

/// The response as the pipeline goes on with it, and its header lines
/// when they are passed through.
fn upstream_response(
    resp: Response<Box<crate::proxy::pool::PooledBody>>,
    settings: &LocationSettings,
) -> (Response<Body>, Option<crate::proxy::client::RawHeaders>) {
    let (mut parts, mut body) = resp.into_parts();
    let raw = body.raw.take();
    strip_hop_by_hop(&mut parts.headers);
    for h in &settings.proxy_hide_header {
        parts.headers.remove(h.as_str());
    }
    (Response::from_parts(parts, Body::from_box(body)), raw)
}

/// An error with its causes (`client error (Connect): invalid peer
/// certificate: UnknownIssuer`), for the log.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Make `full()` usable by siblings.
pub fn full_body(b: impl Into<Bytes>) -> Body {
    full(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host check as it was first written (by `str` methods), the
    /// oracle for the table-driven one.
    fn host_only_reference(raw: &str) -> Option<String> {
        if raw.is_empty() {
            return Some(String::new());
        }
        let h: &str = if raw.starts_with('[') {
            let end = raw.find(']')?;
            &raw[..=end]
        } else {
            match raw.rsplit_once(':') {
                Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
                Some(_) => return None,
                None => raw,
            }
        };
        if !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b))
        {
            return None;
        }
        Some(h.trim_end_matches('.').to_ascii_lowercase())
    }

    #[test]
    fn host_only_keeps_the_host_and_refuses_what_is_not_one() {
        for (raw, want) in [
            ("127.0.0.1:9201", Some("127.0.0.1")),
            ("Example.COM.", Some("example.com")),
            ("api.example.com:443", Some("api.example.com")),
            ("[::1]:8080", Some("[::1]")),
            ("[::1", None),
            ("host:http", None),
            ("a b", None),
            ("caf\u{e9}.example", None),
            ("", Some("")),
        ] {
            assert_eq!(host_only(raw).as_deref(), want, "{raw:?}");
        }
        proptest::proptest!(|(raw in "[a-zA-Z0-9:.\\[\\]_ \u{e9}/-]{0,12}")| {
            proptest::prop_assert_eq!(
                host_only(&raw).map(|h| h.into_owned()),
                host_only_reference(&raw),
                "{:?}",
                raw
            );
        });
    }

    #[test]
    fn connection_options_asked_one_by_one_are_the_list() {
        let values: &[&[&[u8]]] = &[
            &[],
            &[b"close"],
            &[b"Keep-Alive"],
            &[b"close, keep-alive"],
            &[b" CLOSE ,, "],
            &[b"close", b"x-foo"],
            &[b"close, x-foo"],
            &[b"keep-alive, close, x-foo, te"],
            &[b"upgrade"],
            &[b"x-forwarded-for, close"],
            &[b"bad name, X-Forwarded-For"],
            &[b"close", b"caf\xc3\xa9, x-foo"],
            &[b"keep-alive, te"],
        ];
        let names: Vec<HeaderName> = [
            "close",
            "keep-alive",
            "x-foo",
            "x-forwarded-for",
            "upgrade",
            "te",
            "host",
            "closed",
        ]
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect();
        for vs in values {
            let mut h = HeaderMap::new();
            for v in *vs {
                h.append(
                    header::CONNECTION,
                    HeaderValue::from_bytes(v).expect("a value"),
                );
            }
            let list = connection_listed(&h);
            let listed = Listed::of(&h);
            for n in &names {
                assert_eq!(listed.contains(n), list.contains(n), "{vs:?} {n}");
                assert_eq!(connection_lists(&h, n), list.contains(n), "{vs:?} {n}");
            }
        }
    }

    #[test]
    fn connection_options_are_listed_as_header_names() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Close, KEEP-ALIVE"),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_static(" x-foo ,,bad name"),
        );
        let listed = connection_listed(&h);
        let want: Vec<HeaderName> = ["close", "keep-alive", "x-foo"]
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect();
        assert_eq!(listed, want);
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn ip_value_writes_what_display_writes() {
        let ips = [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "255.255.255.255",
            "::1",
            "2001:db8::ffff:1.2.3.4",
        ];
        for text in ips {
            let ip: IpAddr = text.parse().expect("an address");
            assert_eq!(format_ip(ip).to_str().ok(), Some(ip.to_string().as_str()));
            // Twice: the second comes from the one-entry cache.
            for _ in 0..2 {
                assert_eq!(ip_value(ip).to_str().ok(), Some(ip.to_string().as_str()));
            }
        }
    }

    #[test]
    fn set_own_replaces_like_insert() {
        let n = |s: &'static str| HeaderName::from_static(s);
        let v = HeaderValue::from_static;
        let mut own = vec![
            (n("x-forwarded-proto"), v("http")),
            (n("x-real-ip"), v("1.2.3.4")),
        ];
        set_own(&mut own, n("x-forwarded-proto"), v("https"));
        set_own(&mut own, n("x-new"), v("1"));
        assert_eq!(
            own,
            [
                (n("x-forwarded-proto"), v("https")),
                (n("x-real-ip"), v("1.2.3.4")),
                (n("x-new"), v("1")),
            ]
        );
        own.push((n("x-new"), v("2")));
        set_own(&mut own, n("x-new"), v("3"));
        assert_eq!(own.iter().filter(|(k, _)| k == "x-new").count(), 1);
        assert_eq!(own[2].1, v("3"));
    }

    #[test]
    fn hop_by_hop_test_matches_the_list() {
        for n in &HOP_BY_HOP {
            assert!(is_hop_by_hop(n), "{n}");
        }
        for n in ["host", "content-length", "x-upgrade", "tee", "connections"] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(n)), "{n}");
            assert!(!hop_by_hop_name(n), "{n}");
        }
        // By name as written, in any case.
        for n in [
            "Connection",
            "KEEP-ALIVE",
            "Transfer-Encoding",
            "te",
            "Proxy-Authorization",
        ] {
            assert!(hop_by_hop_name(n), "{n}");
        }
    }

    #[test]
    fn strip_hop_by_hop_removes_listed_and_fixed_names_only() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type"]);
        // Nothing to strip: the map is untouched.
        let mut plain = HeaderMap::new();
        plain.insert(header::ETAG, HeaderValue::from_static("\"a\""));
        plain.insert("x-private", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2);
    }
}

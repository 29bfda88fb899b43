//! The request path: route, then the location's handler — `return`,
//! `proxy_pass` (URI splice, forwarded headers, retries) or `aggregate`.
//!
//! Every error the gateway produces itself is the JSON body of LANGUAGE.md
//! §4 with the request id, and each failure maps to its status in
//! [`ProxyError::status`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::compile::normalize::normalize_path;
use crate::compile::router::Lookup;
use crate::config::model::{Handler, Location, LocationSettings, Modifier, ProxyPass, ProxyTarget, Return, Server};
use crate::gateway::Gateway;
use crate::proxy::balance::{Outcome, PickContext, Tried};
use crate::proxy::vars::RequestVars;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// What every request handler shares: the current snapshot and the
/// upstream connection pools.
pub struct Shared {
    pub gateway: ArcSwap<Gateway>,
    clients: std::sync::RwLock<Vec<(Duration, Client<HttpConnector, Body>)>>,
}

impl Shared {
    pub fn new(gateway: Gateway) -> Shared {
        Shared {
            gateway: ArcSwap::from_pointee(gateway),
            clients: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// The pooled client for a connect timeout (pools are shared by every
    /// location with the same timeout, and survive reloads).
    pub fn client_for(&self, connect_timeout: Duration) -> Client<HttpConnector, Body> {
        self.client(connect_timeout)
    }

    fn client(&self, connect_timeout: Duration) -> Client<HttpConnector, Body> {
        if let Ok(list) = self.clients.read() {
            if let Some((_, c)) = list.iter().find(|(d, _)| *d == connect_timeout) {
                return c.clone();
            }
        }
        let mut conn = HttpConnector::new();
        conn.set_connect_timeout(Some(connect_timeout));
        conn.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(conn);
        if let Ok(mut list) = self.clients.write() {
            list.push((connect_timeout, client.clone()));
        }
        client
    }
}

/// The connection a request came in on.
#[derive(Debug, Clone, Copy)]
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
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest => StatusCode::BAD_REQUEST,
            ProxyError::NotFound => StatusCode::NOT_FOUND,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoUpstream => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadGateway => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// `{"error": "...", "status": N, "request_id": "..."}`
pub fn error_response(status: StatusCode, message: &str, request_id: &str, id_header: &str) -> Response<Body> {
    let body = serde_json::json!({"error": message, "status": status.as_u16(), "request_id": request_id});
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let (Ok(n), Ok(v)) = (HeaderName::try_from(id_header), HeaderValue::try_from(request_id)) {
        resp.headers_mut().insert(n, v);
    }
    resp
}

/// A sane incoming id is kept (§4): ≤ 128 chars of `[A-Za-z0-9._:-]`.
fn sane_id(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let ok = !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    ok.then_some(s)
}

pub fn new_request_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, and the proxy-auth pair).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Remove hop-by-hop headers and those listed in `Connection`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
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
    let Some(hname) = &server.real_ip.header else { return peer };
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

/// Serve one request.
pub async fn handle(shared: Arc<Shared>, conn: ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let gw = shared.gateway.load_full();
    let default_id_header = "x-request-id";
    // The Host: exactly one on HTTP/1.1, else the authority (h2).
    let hosts: Vec<&HeaderValue> = req.headers().get_all(header::HOST).iter().collect();
    let host_raw: Option<String> = match hosts.len() {
        0 => req.uri().authority().map(|a| a.as_str().to_string()),
        1 => hosts[0].to_str().ok().map(str::to_string),
        _ => None,
    };
    let fresh_id = || {
        req.headers()
            .get(default_id_header)
            .and_then(sane_id)
            .map(str::to_string)
            .unwrap_or_else(new_request_id)
    };
    if hosts.len() > 1 || (req.version() == http::Version::HTTP_11 && host_raw.is_none()) {
        return error_response(StatusCode::BAD_REQUEST, "Bad request", &fresh_id(), default_id_header);
    }
    let host_raw = host_raw.unwrap_or_default();
    let host = host_only(&host_raw);
    if host.is_none() {
        return error_response(StatusCode::BAD_REQUEST, "Bad request", &fresh_id(), default_id_header);
    }
    let host = host.unwrap_or_default();
    let Some(pq) = req.uri().path_and_query().cloned() else {
        return error_response(StatusCode::BAD_REQUEST, "Bad request", &fresh_id(), default_id_header);
    };
    let raw_path = pq.path();
    if !raw_path.starts_with('/') {
        return error_response(StatusCode::BAD_REQUEST, "Bad request", &fresh_id(), default_id_header);
    }
    let path = match normalize_path(raw_path) {
        Ok(p) => p.into_owned(),
        Err(_) => return error_response(StatusCode::BAD_REQUEST, "Bad request", &fresh_id(), default_id_header),
    };
    let Some(si) = gw.router.select_server(conn.local, Some(&host)) else {
        return error_response(StatusCode::NOT_FOUND, "Not found", &fresh_id(), default_id_header);
    };
    let server = &gw.config.servers[si];
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
            let settings = &server.locations[location].settings;
            let id = request_id(&req, settings);
            let mut target = encode_path(&format!("{path}/"));
            if let Some(q) = pq.query() {
                target.push('?');
                target.push_str(q);
            }
            let mut resp = error_response(StatusCode::MOVED_PERMANENTLY, "Moved permanently", &id, &settings.request_id_header);
            if let Ok(v) = HeaderValue::try_from(target) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            return resp;
        }
        Lookup::NotFound => {
            return error_response(StatusCode::NOT_FOUND, "Not found", &fresh_id(), default_id_header);
        }
    };
    let loc = &server.locations[li];
    let settings = &loc.settings;
    let id = request_id(&req, settings);
    let remote = remote_addr(server, conn.peer.ip(), req.headers());
    let server_name = server
        .names
        .iter()
        .find_map(|n| match n {
            crate::config::model::ServerName::Exact(x) => Some(x.as_str()),
            _ => None,
        })
        .unwrap_or("");
    let effective_host = if host.is_empty() { server_name.to_string() } else { host.clone() };
    let request_uri = pq.as_str().to_string();
    let args = pq.query().unwrap_or("").to_string();
    let method = req.method().clone();
    let headers_snapshot = req.headers().clone();
    let vars = RequestVars {
        remote_addr: remote,
        host: &effective_host,
        scheme: if conn.tls { "https" } else { "http" },
        method: method.as_str(),
        uri: &path,
        request_uri: &request_uri,
        args: &args,
        headers: &headers_snapshot,
        request_id: &id,
        server_name,
        server_port: conn.local.port(),
        captures: &captures,
        named: &named,
    };
    let handler = match &server.server_return {
        Some(r) => Handler::Return(r.clone()),
        None => loc.handler.clone(),
    };
    let mut resp = match &handler {
        Handler::Return(r) => return_response(r, &vars),
        Handler::Proxy(p) => {
            let ctx = ProxyCtx {
                gw: &gw,
                loc,
                vars: &vars,
                host_raw: &host_raw,
                conn,
                path: &path,
            };
            match proxy(&shared, &ctx, p, req).await {
                Ok(r) => r,
                Err(e) => error_response(e.status(), &e.to_string(), &id, &settings.request_id_header),
            }
        }
        Handler::Aggregate(a) => crate::proxy::aggregate::run(&shared, &gw, a, &vars, settings, &headers_snapshot).await,
    };
    finish_response(&mut resp, settings, &vars);
    resp
}

fn host_only(raw: &str) -> Option<String> {
    if raw.is_empty() {
        return Some(String::new());
    }
    let h = if let Some(rest) = raw.strip_prefix('[') {
        let end = rest.find(']')?;
        format!("[{}]", &rest[..end])
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
            Some(_) => return None,
            None => raw.to_string(),
        }
    };
    let ok = h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
    ok.then(|| h.trim_end_matches('.').to_ascii_lowercase())
}

fn request_id<B>(req: &Request<B>, settings: &LocationSettings) -> String {
    req.headers()
        .get(settings.request_id_header.as_str())
        .and_then(sane_id)
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// Response headers every answer of a location gets: `add_header`, the
/// request id.
fn finish_response(resp: &mut Response<Body>, settings: &LocationSettings, vars: &RequestVars<'_>) {
    let status = resp.status().as_u16();
    let ok_status = (200..400).contains(&status);
    for h in &settings.add_header {
        if h.always || ok_status {
            let v = vars.render(&h.value);
            if v.is_empty() {
                continue;
            }
            if let (Ok(n), Ok(v)) = (HeaderName::try_from(h.name.as_str()), HeaderValue::try_from(v)) {
                resp.headers_mut().append(n, v);
            }
        }
    }
    if let (Ok(n), Ok(v)) = (
        HeaderName::try_from(settings.request_id_header.as_str()),
        HeaderValue::try_from(vars.request_id),
    ) {
        resp.headers_mut().insert(n, v);
    }
}

fn return_response(r: &Return, vars: &RequestVars<'_>) -> Response<Body> {
    match r {
        Return::Text { code, text } => {
            let body = text.as_ref().map(|t| vars.render(t)).unwrap_or_default();
            let mut resp = Response::new(if body.is_empty() { empty() } else { full(body) });
            *resp.status_mut() = StatusCode::from_u16(*code).unwrap_or(StatusCode::OK);
            if text.is_some() {
                resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
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
    conn: ConnInfo,
    path: &'a str,
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
            let c: Vec<Option<String>> = (0..caps.len()).map(|i| caps.get(i).map(|m| m.as_str().to_string())).collect();
            let named: Vec<(String, String)> = rw
                .regex
                .capture_names()
                .flatten()
                .filter_map(|n| caps.name(n).map(|m| (n.to_string(), m.as_str().to_string())))
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
            if s.starts_with('/') { s } else { format!("/{s}") }
        }
        Some(t) => {
            let base = t.as_literal().unwrap_or_default();
            let rest = match ctx.loc.modifier {
                Modifier::Prefix | Modifier::PrefixNoRegex => ctx.path.get(ctx.loc.pattern.len()..).unwrap_or(""),
                _ => "",
            };
            let mut s = encode_path(&format!("{base}{rest}"));
            query(&mut s);
            s
        }
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

async fn proxy(shared: &Shared, ctx: &ProxyCtx<'_>, p: &ProxyPass, req: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
    let settings = &ctx.loc.settings;
    let (parts, body) = req.into_parts();
    // Body size: refuse up front when announced, cut when streamed.
    let limit = settings.client_max_body_size;
    let content_length: Option<u64> = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if limit > 0 && content_length.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge);
    }
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    let has_body = chunked || content_length.is_some_and(|n| n > 0);
    let mut body: Option<Body> = if has_body {
        let b: Body = if limit > 0 {
            http_body_util::Limited::new(body, limit as usize).boxed()
        } else {
            body.map_err(|e| Box::new(e) as BoxError).boxed()
        };
        Some(b)
    } else {
        None
    };
    let target = upstream_target(ctx, p);
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    let peer_ip = ctx.conn.peer.ip().to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {peer_ip}"),
        _ => peer_ip,
    };
    let set = |h: &mut HeaderMap, n: &'static str, v: &str| {
        if let Ok(v) = HeaderValue::try_from(v) {
            h.insert(n, v);
        }
    };
    set(&mut headers, "x-forwarded-for", &xff);
    set(&mut headers, "x-forwarded-proto", ctx.vars.scheme);
    set(&mut headers, "x-forwarded-host", ctx.host_raw);
    set(&mut headers, "x-real-ip", &ctx.vars.remote_addr.to_string());
    if let (Ok(n), Ok(v)) = (
        HeaderName::try_from(settings.request_id_header.as_str()),
        HeaderValue::try_from(ctx.vars.request_id),
    ) {
        headers.insert(n, v);
    }
    let mut host_override: Option<String> = None;
    for (name, value) in &settings.proxy_set_header {
        let v = ctx.vars.render(value);
        if name == "host" {
            host_override = Some(v);
            continue;
        }
        let Ok(n) = HeaderName::try_from(name.as_str()) else { continue };
        if v.is_empty() {
            headers.remove(&n);
        } else if let Ok(v) = HeaderValue::try_from(v) {
            headers.insert(n, v);
        }
    }
    let client = shared.client(settings.proxy_connect_timeout);
    let read_timeout = settings.proxy_read_timeout;
    let next = settings.proxy_next_upstream;
    let can_resend = idempotent(&parts.method) || next.non_idempotent;

    // The peers to try.
    let pool = match &p.target {
        ProxyTarget::Upstream(i) => ctx.gw.upstreams.get(*i).cloned(),
        ProxyTarget::Address { .. } => None,
    };
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
    let hash_key;
    let hash_key_bytes: Option<&[u8]> = match &pool {
        Some(pool) => match &pool.def.balance {
            crate::config::model::Balance::Hash { key, .. } => {
                hash_key = ctx.vars.render(key);
                Some(hash_key.as_bytes())
            }
            _ => None,
        },
        None => None,
    };
    for attempt in 0..max_tries {
        let (authority, host_header, pick) = match &pool {
            Some(pool) => {
                let mut pc = PickContext::new(Instant::now()).client_ip(ctx.vars.remote_addr).tried(&tried);
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
                (pool.addrs[i].to_string(), pool.hosts[i].clone(), Some(pick))
            }
            None => match &p.target {
                ProxyTarget::Address { host, port } => (format!("{host}:{port}"), format!("{host}:{port}"), None),
                ProxyTarget::Upstream(_) => return Err(ProxyError::NoUpstream),
            },
        };
        if let Some(pk) = &pick {
            tried.insert(pk.peer());
        }
        let uri: Uri = match format!("http://{authority}{target}").parse() {
            Ok(u) => u,
            Err(_) => return Err(ProxyError::BadRequest),
        };
        let mut builder = Request::builder().method(parts.method.clone()).uri(uri);
        if let Some(h) = builder.headers_mut() {
            *h = headers.clone();
            let host_value = host_override.clone().unwrap_or(host_header);
            if let Ok(v) = HeaderValue::try_from(host_value) {
                h.insert(header::HOST, v);
            }
        }
        let sent_body = body.take();
        let had_body = sent_body.is_some();
        let up_req = match builder.body(sent_body.unwrap_or_else(empty)) {
            Ok(r) => r,
            Err(_) => return Err(ProxyError::BadRequest),
        };
        let result = tokio::time::timeout(read_timeout, client.request(up_req)).await;
        let report = |o: Outcome| {
            if let (Some(pool), Some(pk)) = (&pool, &pick) {
                pool.peers.report(pk.peer(), o, Instant::now());
            }
        };
        let retry_allowed = !had_body && attempt + 1 < max_tries;
        match result {
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                let retry_status = (status == 502 && next.http_502) || (status == 503 && next.http_503) || (status == 504 && next.http_504);
                if retry_status {
                    report(Outcome::Failure);
                    if retry_allowed && can_resend {
                        continue;
                    }
                } else {
                    report(Outcome::Success);
                }
                return Ok(upstream_response(resp, settings));
            }
            Ok(Err(e)) => {
                // A streamed body over client_max_body_size is the client's
                // fault: 413, and no mark against the upstream.
                if body_too_large(&e) {
                    return Err(ProxyError::BodyTooLarge);
                }
                report(Outcome::Failure);
                let connect = e.is_connect();
                tracing::warn!(upstream = %authority, error = %e, "upstream request failed");
                last_err = ProxyError::BadGateway;
                // A connect error means nothing was sent: always safe to retry.
                if next.error && retry_allowed && (connect || can_resend) {
                    continue;
                }
                break;
            }
            Err(_) => {
                report(Outcome::Failure);
                tracing::warn!(upstream = %authority, "upstream timed out");
                last_err = ProxyError::Timeout;
                if next.timeout && retry_allowed && can_resend {
                    continue;
                }
                break;
            }
        }
    }
    Err(last_err)
}

fn body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn upstream_response(resp: Response<Incoming>, settings: &LocationSettings) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    for h in &settings.proxy_hide_header {
        parts.headers.remove(h.as_str());
    }
    Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
}

/// Make `full()` usable by siblings.
pub fn full_body(b: impl Into<Bytes>) -> Body {
    full(b)
}

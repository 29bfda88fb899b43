//! The validated config: typed settings, spans kept for later diagnostics.
//!
//! This is what `validate` produces and `compile` consumes. Every value is
//! parsed (sizes are bytes, durations are `Duration`s, variables are
//! [`Template`]s) and inheritance is resolved: each [`Location`] carries its
//! effective [`LocationSettings`]. Nothing here does I/O.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::source::Span;

/// A whole validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// `worker_threads N`; `None` = one per core.
    pub worker_threads: Option<usize>,
    pub error_log: ErrorLog,
    pub shutdown_timeout: Duration,
    /// `memory_trim on|off` (default on): see `server::memory`.
    pub memory_trim: bool,
    pub admin: Option<Admin>,
    pub upstreams: Vec<Upstream>,
    pub jwt: Vec<JwtDef>,
    pub rate_limits: Vec<RateLimitDef>,
    pub caches: Vec<CacheDef>,
    pub servers: Vec<Server>,
    /// Top-level location settings (what a request that matches no server
    /// or location gets: its access log, its request id header).
    pub defaults: LocationSettings,
    /// Every file read (top file first): what the reload watcher watches.
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorLog {
    pub target: LogTarget,
    pub level: LogLevel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LogTarget {
    Stdout,
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AccessLog {
    Off,
    On {
        target: LogTarget,
        format: AccessLogFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessLogFormat {
    Json,
    Combined,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// `allow CIDR;` entries (extension): who may talk to the admin listener.
    pub allow: Vec<Cidr>,
    pub span: Span,
}

/// An IP network, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix as u32)
                };
                (u32::from(a) & mask) == (u32::from(b) & mask)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix as u32)
                };
                (u128::from(a) & mask) == (u128::from(b) & mask)
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------- variables

/// A request variable (LANGUAGE.md §1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Var {
    RemoteAddr,
    Host,
    Scheme,
    RequestMethod,
    /// The normalized path.
    Uri,
    /// The request target as received.
    RequestUri,
    Args,
    /// `$arg_NAME`
    Arg(String),
    /// `$http_NAME`: the header name, lowercased, `_` turned into `-`.
    Http(String),
    /// `$cookie_NAME`
    Cookie(String),
    RequestId,
    /// `$1`..`$9`
    Capture(u8),
    /// A named regex capture.
    Named(String),
    /// `$jwt_claim_NAME`
    JwtClaim(String),
    /// `$server_name` (extension): the first `server_name` of the chosen server.
    ServerName,
    /// `$server_port` (extension): the port the request came in on.
    ServerPort,
    /// `$is_args` (extension, NGINX's): `?` when the request has a query,
    /// empty otherwise.
    IsArgs,
}

/// One piece of a [`Template`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Piece {
    Lit(String),
    Var(Var),
    /// `$CALL.a.b`: a field of an earlier aggregate call's JSON response.
    CallRef {
        call: String,
        path: Vec<String>,
    },
}

/// A string with variables, parsed once at load time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Template {
    pub pieces: Vec<Piece>,
}

impl Template {
    pub fn literal(s: impl Into<String>) -> Template {
        Template {
            pieces: vec![Piece::Lit(s.into())],
        }
    }

    /// `Some(text)` when the template has no variables.
    pub fn as_literal(&self) -> Option<String> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                _ => return None,
            }
        }
        Some(out)
    }

    /// `Some(v)` when the template is one variable and nothing else.
    pub fn single_var(&self) -> Option<&Var> {
        match self.pieces.as_slice() {
            [Piece::Var(v)] => Some(v),
            _ => None,
        }
    }

    pub fn has_vars(&self) -> bool {
        self.pieces.iter().any(|p| !matches!(p, Piece::Lit(_)))
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Var(v) => Some(v),
            _ => None,
        })
    }
}

// ---------------------------------------------------------------- upstreams

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub span: Span,
    pub servers: Vec<UpstreamServer>,
    pub balance: Balance,
    /// `keepalive N`: idle connections kept (default 32).
    pub keepalive: usize,
    pub health_check: Option<HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamServer {
    /// `host:port` as written.
    pub address: String,
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub backup: bool,
    /// `resolve`: re-resolve the host name every `resolve_ttl`.
    pub resolve: bool,
    pub resolve_ttl: Duration,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    Random { two: bool },
    IpHash,
    Hash { key: Template, consistent: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub uri: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub fails: u32,
    pub passes: u32,
}

// ---------------------------------------------------------------- policies

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwtAlg {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl JwtAlg {
    pub fn is_hmac(self) -> bool {
        matches!(self, JwtAlg::HS256 | JwtAlg::HS384 | JwtAlg::HS512)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JwtKeySource {
    KeyFile(PathBuf),
    /// The secret bytes (from `$env_NAME` or literal).
    Secret(String),
    JwksFile(PathBuf),
    JwksUrl {
        url: String,
        refresh: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenFrom {
    Header(String),
    Cookie(String),
    Query(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtDef {
    pub name: String,
    pub span: Span,
    pub algorithms: Vec<JwtAlg>,
    pub keys: JwtKeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
    pub require_claims: Vec<String>,
    pub token_from: TokenFrom,
    /// (claim, header name)
    pub forward_claims: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RateStore {
    Memory,
    /// `redis://host:port/db` as written.
    Redis(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Requests admitted per `per`.
    pub requests: u64,
    pub per: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimitDef {
    pub name: String,
    pub span: Span,
    pub key: Template,
    pub rate: Rate,
    pub burst: u64,
    pub store: RateStore,
    pub max_keys: u64,
    /// `true` = allow (the default), `false` = deny with 503.
    pub on_store_error_allow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheDef {
    pub name: String,
    pub span: Span,
    pub max_size: u64,
    pub ttl: Duration,
    pub key: Template,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub methods: Vec<String>,
    /// `max_entry_size` (extension): bodies larger than this stream through
    /// uncached. Default: 1/8 of `max_size`, at most 8m.
    pub max_entry_size: u64,
}

// ---------------------------------------------------------------- servers

#[derive(Debug, Clone)]
pub struct Server {
    pub span: Span,
    pub listens: Vec<Listen>,
    pub names: Vec<ServerName>,
    pub tls: Option<Tls>,
    pub limits: ClientLimits,
    pub real_ip: RealIp,
    /// Server-level `return` (runs before location matching, as NGINX).
    pub server_return: Option<Return>,
    /// Server-level location settings (for requests no location matches).
    pub settings: LocationSettings,
    pub locations: Vec<Location>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Listen {
    pub addr: SocketAddr,
    pub ssl: bool,
    pub http2: bool,
    pub default_server: bool,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub enum ServerName {
    Exact(String),
    /// `*.example.com` → suffix `.example.com`
    LeadingWildcard(String),
    /// `www.example.*` → prefix `www.example.`
    TrailingWildcard(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tls {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_size: u64,
    pub max_connections: Option<usize>,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            header_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            max_header_size: 32 * 1024,
            max_connections: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RealIp {
    pub trusted: Vec<Cidr>,
    /// Lowercased header name; `None` = not configured.
    pub header: Option<String>,
}

// ---------------------------------------------------------------- locations

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Modifier {
    /// `location /x`
    Prefix,
    /// `location = /x`
    Exact,
    /// `location ^~ /x`
    PrefixNoRegex,
    /// `location ~ re`
    Regex,
    /// `location ~* re`
    RegexCaseless,
}

impl Modifier {
    pub fn as_str(self) -> &'static str {
        match self {
            Modifier::Prefix => "",
            Modifier::Exact => "=",
            Modifier::PrefixNoRegex => "^~",
            Modifier::Regex => "~",
            Modifier::RegexCaseless => "~*",
        }
    }

    pub fn is_regex(self) -> bool {
        matches!(self, Modifier::Regex | Modifier::RegexCaseless)
    }
}

#[derive(Debug, Clone)]
pub struct Location {
    pub span: Span,
    pub modifier: Modifier,
    /// The URI or regex as written.
    pub pattern: String,
    /// Compiled for regex locations (with `(?i)` for `~*`).
    pub regex: Option<regex::Regex>,
    /// The location as written with its modifier: `= /health`, `/api/`,
    /// `~ ^/x$` (the metrics `route` label).
    pub route: String,
    pub handler: Handler,
    pub rewrites: Vec<Rewrite>,
    pub settings: LocationSettings,
}

#[derive(Debug, Clone)]
pub enum Handler {
    Proxy(ProxyPass),
    Return(Return),
    Aggregate(Aggregate),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProxyTarget {
    /// Index into [`Config::upstreams`].
    Upstream(usize),
    /// An explicit `host:port`.
    Address { host: String, port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyPass {
    pub tls: bool,
    pub target: ProxyTarget,
    /// The URI part (`None` when absent). With variables it is the full
    /// upstream URI.
    pub uri: Option<Template>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Return {
    /// `return CODE [TEXT]`
    Text { code: u16, text: Option<Template> },
    /// `return 301|302|303|307|308 URL`
    Redirect { code: u16, url: Template },
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    pub regex: regex::Regex,
    pub replacement: Template,
    /// `break` given (the only flag in v1; without it NGINX would go on
    /// with the next rewrite, which is what happens here too).
    pub brk: bool,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Aggregate {
    pub calls: Vec<AggregateCall>,
    pub timeout: Duration,
    /// `true` = partial, `false` = fail.
    pub partial: bool,
    /// Calls grouped in waves: every call of a wave depends only on calls of
    /// earlier waves. Indices into `calls`.
    pub waves: Vec<Vec<usize>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggregateCall {
    pub name: String,
    pub tls: bool,
    pub target: ProxyTarget,
    /// The path and query, with variables and `$CALL.field` references.
    pub uri: Template,
    /// Indices of the calls this one refers to.
    pub deps: Vec<usize>,
    pub span: Span,
}

/// `proxy_next_upstream` conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NextUpstream {
    pub error: bool,
    pub timeout: bool,
    pub http_502: bool,
    pub http_503: bool,
    pub http_504: bool,
    pub non_idempotent: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AddHeader {
    pub name: String,
    pub value: Template,
    pub always: bool,
    pub built: HeaderBuilt,
}

/// `proxy_set_header NAME VALUE` (the name lowercased).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetHeader {
    pub name: String,
    pub value: Template,
    pub built: HeaderBuilt,
}

/// A header directive's name parsed once at load, and its value built once
/// when it has no variables and is not empty: the request path clones them
/// (reference counts) instead of parsing the name and rendering the value
/// on every request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct HeaderBuilt {
    pub name: Option<http::HeaderName>,
    pub value: Option<http::HeaderValue>,
}

impl HeaderBuilt {
    pub fn new(name: &str, value: &Template) -> HeaderBuilt {
        HeaderBuilt {
            name: http::HeaderName::try_from(name).ok(),
            value: value
                .as_literal()
                .filter(|v| !v.is_empty())
                .and_then(|v| http::HeaderValue::try_from(v).ok()),
        }
    }
}

/// What a location does besides its handler, after inheritance from main
/// and server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocationSettings {
    /// (lowercased name, value); an empty value removes the header.
    pub proxy_set_header: Vec<SetHeader>,
    /// Lowercased names.
    pub proxy_hide_header: Vec<String>,
    pub add_header: Vec<AddHeader>,
    pub request_id_header: String,
    pub wrap_response: bool,
    pub wrap_response_max_size: u64,
    pub proxy_connect_timeout: Duration,
    pub proxy_read_timeout: Duration,
    pub proxy_send_timeout: Duration,
    pub proxy_next_upstream: NextUpstream,
    /// 0 = as many as there are servers.
    pub proxy_next_upstream_tries: u32,
    /// 0 = unlimited.
    pub client_max_body_size: u64,
    /// Index into [`Config::jwt`].
    pub auth_jwt: Option<usize>,
    /// Indices into [`Config::rate_limits`], each once, in order applied.
    pub rate_limits: Vec<usize>,
    /// Index into [`Config::caches`].
    pub cache: Option<usize>,
    pub access_log: AccessLog,
    /// `proxy_ssl_trusted_certificate FILE` (extension, for https upstreams).
    pub proxy_ssl_trusted_certificate: Option<PathBuf>,
}

impl Default for LocationSettings {
    fn default() -> Self {
        LocationSettings {
            proxy_set_header: Vec::new(),
            proxy_hide_header: Vec::new(),
            add_header: Vec::new(),
            request_id_header: "x-request-id".to_string(),
            wrap_response: false,
            wrap_response_max_size: 1024 * 1024,
            proxy_connect_timeout: Duration::from_secs(5),
            proxy_read_timeout: Duration::from_secs(60),
            proxy_send_timeout: Duration::from_secs(60),
            proxy_next_upstream: NextUpstream {
                error: true,
                timeout: true,
                ..NextUpstream::default()
            },
            proxy_next_upstream_tries: 3,
            client_max_body_size: 1024 * 1024,
            auth_jwt: None,
            rate_limits: Vec::new(),
            cache: None,
            access_log: AccessLog::On {
                target: LogTarget::Stdout,
                format: AccessLogFormat::Json,
            },
            proxy_ssl_trusted_certificate: None,
        }
    }
}

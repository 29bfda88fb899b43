//! The directive table: one entry per directive of LANGUAGE.md §2–§11.
//!
//! Each [`DirectiveSpec`] says where a directive may appear, how many
//! arguments it takes, whether it has a block, a one-line syntax and doc
//! (used by "did you mean", the diagnostics and the docs), and a `check`
//! function that turns the directive into a typed [`Setting`] while spans
//! still exist. Adding a directive is one entry here plus one `Setting`
//! variant, which the assembler in `validate` must then handle (its match
//! has no `_` arm).

use std::path::PathBuf;
use std::time::Duration;

use crate::config::ast::Directive;
use crate::config::model::{
    AccessLog, AddHeader, Admin, Aggregate, CacheDef, Cidr, ErrorLog, JwtDef, Listen, Modifier,
    NextUpstream, ProxyPass, RateLimitDef, Return, Rewrite, ServerName, Template, Upstream,
};
use crate::config::source::Span;
use crate::config::validate::{self as v, Cx};

/// Where a directive can stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ctx {
    Main,
    Server,
    Location,
    Upstream,
    AuthJwt,
    RateLimit,
    Cache,
    Admin,
    Aggregate,
}

impl Ctx {
    pub fn name(self) -> &'static str {
        match self {
            Ctx::Main => "the top level",
            Ctx::Server => "`server`",
            Ctx::Location => "`location`",
            Ctx::Upstream => "`upstream`",
            Ctx::AuthJwt => "`auth_jwt` definitions",
            Ctx::RateLimit => "`rate_limit` definitions",
            Ctx::Cache => "`cache` definitions",
            Ctx::Admin => "`admin`",
            Ctx::Aggregate => "`aggregate`",
        }
    }
}

/// Whether a directive takes a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `name args;`
    No,
    /// `name args { ... }`
    Yes,
}

pub type CheckFn = fn(&mut Cx<'_>, &Directive) -> Option<Setting>;

/// One directive.
pub struct DirectiveSpec {
    pub name: &'static str,
    pub contexts: &'static [Ctx],
    /// Minimum and maximum number of arguments.
    pub args: (usize, usize),
    pub block: BlockKind,
    /// How it is written, e.g. `proxy_pass http://UPSTREAM[/URI];`
    pub syntax: &'static str,
    pub doc: &'static str,
    pub check: CheckFn,
}

/// A typed setting: what a directive says, once checked.
#[derive(Debug, Clone)]
pub enum Setting {
    // main
    WorkerThreads(Option<usize>),
    ErrorLog(ErrorLog),
    ShutdownTimeout(Duration),
    MemoryTrim(bool),
    Admin(Admin),
    Upstream(Upstream),
    JwtDef(JwtDef),
    RateLimitDef(RateLimitDef),
    CacheDef(CacheDef),
    Server(ServerDraft),
    // server
    Listen(Listen),
    ServerName(Vec<ServerName>),
    SslCertificate(PathBuf),
    SslCertificateKey(PathBuf),
    Location(LocationDraft),
    // client side (main, server)
    ClientHeaderTimeout(Duration),
    ClientBodyTimeout(Duration),
    KeepaliveTimeout(Duration),
    ClientMaxHeaderSize(u64),
    MaxConnections(usize),
    SetRealIpFrom(Cidr),
    RealIpHeader(String),
    // handlers (location; `return` also server)
    ProxyPass(ProxyPass),
    Return(Return),
    Aggregate(Aggregate),
    Rewrite(Rewrite),
    // inherited location settings (main, server, location)
    ProxySetHeader(String, Template),
    ProxyHideHeader(String),
    AddHeader(AddHeader),
    RequestIdHeader(String),
    WrapResponse(bool),
    WrapResponseMaxSize(u64),
    ProxyConnectTimeout(Duration),
    ProxyReadTimeout(Duration),
    ProxySendTimeout(Duration),
    ProxyNextUpstream(NextUpstream),
    ProxyNextUpstreamTries(u32),
    ClientMaxBodySize(u64),
    ProxySslTrustedCertificate(PathBuf),
    /// `auth_jwt NAME;` (index) or `auth_jwt off;` (None).
    AuthJwt(Option<usize>),
    RateLimit(Option<usize>),
    Cache(Option<usize>),
    AccessLog(AccessLog),
    /// A directive that has been fully handled by its parent's check (block
    /// members of definitions, `include`).
    Consumed,
}

/// A checked directive with its spans.
#[derive(Debug, Clone)]
pub struct Item {
    pub setting: Setting,
    pub span: Span,
    pub name_span: Span,
}

/// A `server` before inheritance is resolved.
#[derive(Debug, Clone)]
pub struct ServerDraft {
    pub items: Vec<Item>,
    /// Spans of server-level arguments that use `$jwt_claim_*`.
    pub jwt_claim_uses: Vec<Span>,
    /// A `listen` was written, valid or not (so that an invalid one is not
    /// also reported as missing).
    pub listen_written: bool,
}

/// A `location` before inheritance is resolved.
#[derive(Debug, Clone)]
pub struct LocationDraft {
    pub span: Span,
    /// The span of the modifier and URI.
    pub key_span: Span,
    pub modifier: Modifier,
    pub pattern: String,
    pub regex: Option<regex::Regex>,
    pub items: Vec<Item>,
    /// Spans of arguments that use `$jwt_claim_*` (checked once the
    /// effective `auth_jwt` is known).
    pub jwt_claim_uses: Vec<Span>,
    /// Name spans of the handler directives written in the location
    /// (`proxy_pass`, `return`, `aggregate`), valid or not.
    pub handlers: Vec<Span>,
    /// An unknown directive that looks like a misspelled handler
    /// (`proxy_passs`): already reported, so no "no handler" on top.
    pub misspelled_handler: bool,
}

const MAIN: &[Ctx] = &[Ctx::Main];
const SERVER: &[Ctx] = &[Ctx::Server];
const LOCATION: &[Ctx] = &[Ctx::Location];
const MAIN_SERVER: &[Ctx] = &[Ctx::Main, Ctx::Server];
const SERVER_LOCATION: &[Ctx] = &[Ctx::Server, Ctx::Location];
const ANY_LEVEL: &[Ctx] = &[Ctx::Main, Ctx::Server, Ctx::Location];
const UPSTREAM: &[Ctx] = &[Ctx::Upstream];
const JWT: &[Ctx] = &[Ctx::AuthJwt];
const RL: &[Ctx] = &[Ctx::RateLimit];
const CACHE: &[Ctx] = &[Ctx::Cache];
const ADMIN: &[Ctx] = &[Ctx::Admin];
const AGG: &[Ctx] = &[Ctx::Aggregate];
const ALL: &[Ctx] = &[
    Ctx::Main,
    Ctx::Server,
    Ctx::Location,
    Ctx::Upstream,
    Ctx::AuthJwt,
    Ctx::RateLimit,
    Ctx::Cache,
    Ctx::Admin,
    Ctx::Aggregate,
];
const MANY: usize = usize::MAX;

macro_rules! d {
    ($name:literal, $ctx:expr, ($min:expr, $max:expr), $block:ident, $syntax:literal, $doc:literal, $check:expr) => {
        DirectiveSpec {
            name: $name,
            contexts: $ctx,
            args: ($min, $max),
            block: BlockKind::$block,
            syntax: $syntax,
            doc: $doc,
            check: $check,
        }
    };
}

/// Every directive. Two entries may share a name when one is the block form
/// (a definition) and the other the `;` form (a use).
// One line per directive: the table reads as a reference.
#[rustfmt::skip]
pub static DIRECTIVES: &[DirectiveSpec] = &[
    // ---- structure
    d!("include", ALL, (1, 1), No, "include GLOB;", "Insert the directives of the matching files (sorted), relative to this file.", v::consumed),
    d!("http", MAIN, (0, 0), Yes, "http { ... }", "A transparent wrapper, so that a file can start the way NGINX files do.", v::consumed),
    d!("server", MAIN, (0, 0), Yes, "server { ... }", "A virtual server: listen addresses, names and locations.", v::server),
    d!("location", SERVER, (1, 2), Yes, "location [=|^~|~|~*] URI { ... }", "Requests whose path matches, chosen with NGINX precedence (§3).", v::location),
    d!("upstream", MAIN, (1, 1), Yes, "upstream NAME { ... }", "A named group of servers with load balancing and health checks (§5).", v::upstream),
    d!("auth_jwt", MAIN, (1, 1), Yes, "auth_jwt NAME { ... }", "Define a JWT authentication policy (§6).", v::jwt_def),
    d!("rate_limit", MAIN, (1, 1), Yes, "rate_limit NAME { ... }", "Define a rate limit (§7).", v::rate_limit_def),
    d!("cache", MAIN, (1, 1), Yes, "cache NAME { ... }", "Define a response cache (§8).", v::cache_def),
    d!("admin", MAIN, (0, 0), Yes, "admin { listen ADDR; }", "The admin listener: metrics, health, config, cache purge (§10).", v::admin),
    // ---- main
    d!("worker_threads", MAIN, (1, 1), No, "worker_threads N|auto;", "Worker threads serving requests (default: one per core).", v::worker_threads),
    d!("error_log", MAIN, (1, 2), No, "error_log stderr|FILE [trace|debug|info|warn|error];", "Where the gateway's own log goes, and how much of it.", v::error_log),
    d!("memory_trim", MAIN, (1, 1), No, "memory_trim on|off;", "Give the memory a burst of requests freed back to the system (default on).", v::memory_trim),
    d!("shutdown_timeout", MAIN, (1, 1), No, "shutdown_timeout DURATION;", "How long SIGTERM waits for in-flight requests (default 30s).", v::shutdown_timeout),
    // ---- server
    d!("listen", SERVER, (1, 4), No, "listen [ADDR:]PORT [ssl] [http2] [default_server];", "An address and port this server accepts connections on.", v::listen),
    d!("server_name", SERVER, (1, MANY), No, "server_name NAME ...;", "Host names: exact, `*.suffix`, `prefix.*`, or `~regex`.", v::server_name),
    d!("ssl_certificate", SERVER, (1, 1), No, "ssl_certificate FILE;", "PEM certificate chain for `listen ... ssl`.", v::ssl_certificate),
    d!("ssl_certificate_key", SERVER, (1, 1), No, "ssl_certificate_key FILE;", "PEM private key for `ssl_certificate`.", v::ssl_certificate_key),
    d!("client_header_timeout", MAIN_SERVER, (1, 1), No, "client_header_timeout DURATION;", "The whole request head must arrive within this (default 60s).", v::client_header_timeout),
    d!("client_body_timeout", MAIN_SERVER, (1, 1), No, "client_body_timeout DURATION;", "Longest wait between two body reads (default 60s).", v::client_body_timeout),
    d!("keepalive_timeout", MAIN_SERVER, (1, 1), No, "keepalive_timeout DURATION;", "How long an idle client connection is kept (default 75s).", v::keepalive_timeout),
    d!("client_max_header_size", MAIN_SERVER, (1, 1), No, "client_max_header_size SIZE;", "Largest request head; larger → 431 (default 32k).", v::client_max_header_size),
    d!("max_connections", MAIN_SERVER, (1, 1), No, "max_connections N;", "Open connections per listener; more wait in the accept queue.", v::max_connections),
    d!("set_real_ip_from", MAIN_SERVER, (1, 1), No, "set_real_ip_from CIDR;", "A trusted proxy whose `real_ip_header` is believed.", v::set_real_ip_from),
    d!("real_ip_header", MAIN_SERVER, (1, 1), No, "real_ip_header X-Forwarded-For;", "The header `$remote_addr` is taken from (trusted peers only).", v::real_ip_header),
    // ---- handlers
    d!("proxy_pass", LOCATION, (1, 1), No, "proxy_pass http://UPSTREAM[/URI];", "Forward the request to an upstream or `host:port` (§4).", v::proxy_pass),
    d!("return", SERVER_LOCATION, (1, 2), No, "return CODE [TEXT]; | return 301|302|303|307|308 URL;", "Answer directly with a status and text, or a redirect.", v::return_),
    d!("aggregate", LOCATION, (0, 0), Yes, "aggregate { call NAME URL; ... }", "Call several upstreams and merge their JSON into one response (§9).", v::aggregate),
    d!("rewrite", LOCATION, (2, 3), No, "rewrite REGEX REPLACEMENT [break];", "Change the path sent upstream.", v::rewrite),
    // ---- inherited location settings
    d!("proxy_set_header", ANY_LEVEL, (2, 2), No, "proxy_set_header NAME VALUE;", "Set a header on the upstream request; an empty value removes it.", v::proxy_set_header),
    d!("proxy_hide_header", ANY_LEVEL, (1, 1), No, "proxy_hide_header NAME;", "Drop a header from the upstream response.", v::proxy_hide_header),
    d!("add_header", ANY_LEVEL, (2, 3), No, "add_header NAME VALUE [always];", "Add a header to the response (2xx/3xx unless `always`).", v::add_header),
    d!("request_id_header", ANY_LEVEL, (1, 1), No, "request_id_header NAME;", "The request id header (default X-Request-Id).", v::request_id_header),
    d!("wrap_response", ANY_LEVEL, (1, 1), No, "wrap_response on|off;", "Wrap JSON responses as {data, timestamp, correlationId}.", v::wrap_response),
    d!("wrap_response_max_size", ANY_LEVEL, (1, 1), No, "wrap_response_max_size SIZE;", "Largest body wrapped (default 1m).", v::wrap_response_max_size),
    d!("proxy_connect_timeout", ANY_LEVEL, (1, 1), No, "proxy_connect_timeout DURATION;", "Connecting to an upstream (default 5s).", v::proxy_connect_timeout),
    d!("proxy_read_timeout", ANY_LEVEL, (1, 1), No, "proxy_read_timeout DURATION;", "Once the request is sent: until the response head, then between two reads of the body (default 60s).", v::proxy_read_timeout),
    d!("proxy_send_timeout", ANY_LEVEL, (1, 1), No, "proxy_send_timeout DURATION;", "Between two writes to the upstream: how long a write may find it taking nothing (default 60s).", v::proxy_send_timeout),
    d!("proxy_next_upstream", ANY_LEVEL, (1, MANY), No, "proxy_next_upstream error|timeout|http_502|http_503|http_504|non_idempotent|off ...;", "When a request is tried on the next server (default error timeout).", v::proxy_next_upstream),
    d!("proxy_next_upstream_tries", ANY_LEVEL, (1, 1), No, "proxy_next_upstream_tries N;", "Most tries per request (default 3; 0 = one per server).", v::proxy_next_upstream_tries),
    d!("client_max_body_size", ANY_LEVEL, (1, 1), No, "client_max_body_size SIZE;", "Largest request body; larger → 413 (default 1m; 0 = unlimited).", v::client_max_body_size),
    d!("proxy_ssl_trusted_certificate", ANY_LEVEL, (1, 1), No, "proxy_ssl_trusted_certificate FILE;", "CA certificates for verifying https:// upstreams (default: system roots).", v::proxy_ssl_trusted_certificate),
    d!("auth_jwt", &[Ctx::Main, Ctx::Server, Ctx::Location], (1, 1), No, "auth_jwt NAME|off;", "Apply a JWT policy here (`off` removes an inherited one).", v::auth_jwt_use),
    d!("rate_limit", &[Ctx::Main, Ctx::Server, Ctx::Location], (1, 1), No, "rate_limit NAME|off;", "Apply a rate limit here (limits accumulate; `off` drops inherited ones).", v::rate_limit_use),
    d!("cache", &[Ctx::Main, Ctx::Server, Ctx::Location], (1, 1), No, "cache NAME|off;", "Cache responses here (`off` removes an inherited cache).", v::cache_use),
    d!("access_log", ANY_LEVEL, (1, 2), No, "access_log stdout|stderr|FILE [json|combined]; | access_log off;", "One line per request (default stdout json).", v::access_log),
    // ---- upstream
    d!("server", UPSTREAM, (1, 8), No, "server HOST:PORT [weight=N] [max_fails=N] [fail_timeout=D] [backup] [resolve];", "A server of the upstream.", v::consumed),
    d!("least_conn", UPSTREAM, (0, 0), No, "least_conn;", "Send to the server with the fewest active requests.", v::consumed),
    d!("random", UPSTREAM, (0, 1), No, "random [two];", "Random by weight; `two`: the less busy of two random picks.", v::consumed),
    d!("ip_hash", UPSTREAM, (0, 0), No, "ip_hash;", "Stick each client address to one server.", v::consumed),
    d!("hash", UPSTREAM, (1, 2), No, "hash KEY [consistent];", "Stick each key to one server; `consistent` = ketama ring.", v::consumed),
    d!("keepalive", UPSTREAM, (1, 1), No, "keepalive N;", "Idle upstream connections kept open (default 32).", v::consumed),
    d!("health_check", UPSTREAM, (0, 5), No, "health_check [uri=/] [interval=5s] [timeout=1s] [fails=3] [passes=2];", "Active health checks.", v::consumed),
    d!("resolve_ttl", UPSTREAM, (1, 1), No, "resolve_ttl DURATION;", "How often `resolve` servers are re-resolved (default 30s).", v::consumed),
    // ---- auth_jwt definition
    d!("algorithms", JWT, (1, MANY), No, "algorithms ALG ...;", "Exactly the accepted algorithms.", v::consumed),
    d!("key_file", JWT, (1, 1), No, "key_file FILE;", "PEM public key(s).", v::consumed),
    d!("secret", JWT, (1, 1), No, "secret VALUE;", "HMAC secret (HS256/384/512).", v::consumed),
    d!("jwks_file", JWT, (1, 1), No, "jwks_file FILE;", "A JWKS file.", v::consumed),
    d!("jwks_url", JWT, (1, 2), No, "jwks_url URL [refresh=10m];", "A JWKS fetched and refreshed.", v::consumed),
    d!("issuer", JWT, (1, 1), No, "issuer ISS;", "Required `iss`.", v::consumed),
    d!("audience", JWT, (1, 1), No, "audience AUD;", "Required `aud`.", v::consumed),
    d!("leeway", JWT, (1, 1), No, "leeway DURATION;", "Clock skew allowed for exp/nbf.", v::consumed),
    d!("require_claims", JWT, (1, MANY), No, "require_claims NAME ...;", "Claims that must be present (exp always is).", v::consumed),
    d!("token_from", JWT, (2, 2), No, "token_from header NAME | cookie NAME | query NAME;", "Where the token is read from (default header Authorization).", v::consumed),
    d!("forward_claim", JWT, (2, 2), No, "forward_claim CLAIM HEADER;", "Send a claim upstream as a header.", v::consumed),
    // ---- rate_limit definition
    d!("key", &[Ctx::RateLimit, Ctx::Cache], (1, 1), No, "key TEMPLATE;", "What requests are counted (or cached) by.", v::consumed),
    d!("rate", RL, (1, 1), No, "rate N r/PERIOD;", "The sustained rate (GCRA).", v::consumed),
    d!("burst", RL, (1, 1), No, "burst N;", "Extra requests allowed at once (default 0).", v::consumed),
    d!("store", RL, (1, 1), No, "store memory | redis://HOST:PORT/DB;", "Where counters live.", v::consumed),
    d!("max_keys", RL, (1, 1), No, "max_keys N;", "Keys kept in memory (least recently seen go first).", v::consumed),
    d!("on_store_error", RL, (1, 1), No, "on_store_error allow|deny;", "What to do when Redis is unreachable (default allow).", v::consumed),
    // ---- cache definition
    d!("max_size", CACHE, (1, 1), No, "max_size SIZE;", "Total bytes of cached bodies and headers.", v::consumed),
    d!("max_entry_size", CACHE, (1, 1), No, "max_entry_size SIZE;", "Largest response stored (extension; default max_size/8, at most 8m).", v::consumed),
    d!("ttl", CACHE, (1, 1), No, "ttl DURATION;", "Freshness when the upstream gives none.", v::consumed),
    d!("stale_while_revalidate", CACHE, (1, 1), No, "stale_while_revalidate DURATION;", "Serve stale while one request refreshes.", v::consumed),
    d!("stale_if_error", CACHE, (1, 1), No, "stale_if_error DURATION;", "Serve stale when the upstream fails.", v::consumed),
    d!("methods", CACHE, (1, MANY), No, "methods METHOD ...;", "Cached methods (default GET HEAD).", v::consumed),
    // ---- admin
    d!("listen", ADMIN, (1, 1), No, "listen ADDR:PORT;", "Where the admin listener binds.", v::consumed),
    d!("allow", ADMIN, (1, 1), No, "allow CIDR;", "Peers allowed to use the admin listener (extension).", v::consumed),
    // ---- aggregate
    d!("call", AGG, (2, 2), No, "call NAME URL;", "A GET to an upstream; `$NAME.field` refers to its JSON.", v::consumed),
    d!("timeout", AGG, (1, 1), No, "timeout DURATION;", "For the whole aggregate.", v::consumed),
    d!("on_error", AGG, (1, 1), No, "on_error partial|fail;", "What a failed call does to the response.", v::consumed),
];

/// [`DIRECTIVES`] by name, built on first use: a config of 10,000
/// locations looks a name up 20,000 times (a scan of the table each took
/// ~8 % of loading it).
fn by_name() -> &'static crate::FastMap<&'static str, Vec<&'static DirectiveSpec>> {
    static BY_NAME: std::sync::OnceLock<crate::FastMap<&'static str, Vec<&'static DirectiveSpec>>> =
        std::sync::OnceLock::new();
    BY_NAME.get_or_init(|| {
        let mut m = crate::FastMap::<&'static str, Vec<&'static DirectiveSpec>>::default();
        for d in DIRECTIVES {
            m.entry(d.name).or_default().push(d);
        }
        m
    })
}

/// Is `name` a directive anywhere? (Used by the parser to spot a missing `;`.)
pub fn is_known_directive(name: &str) -> bool {
    by_name().contains_key(name)
}

/// The entries named `name` (one or two), in the table's order.
pub fn lookup(name: &str) -> impl Iterator<Item = &'static DirectiveSpec> {
    by_name().get(name).into_iter().flatten().copied()
}

/// The names allowed in a context, for "did you mean".
pub fn names_in(ctx: Ctx) -> impl Iterator<Item = &'static str> {
    DIRECTIVES
        .iter()
        .filter(move |d| d.contexts.contains(&ctx))
        .map(|d| d.name)
}

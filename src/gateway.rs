//! The immutable snapshot that serving runs on: the contract between
//! `compile` and `server`.
//!
//! A [`Gateway`] holds the validated config, the compiled router and the
//! upstream pools. It is built once per (re)load by [`compile`] and swapped
//! atomically; a request loads it once and never sees two configs. State
//! that must outlive a reload (upstream health) is carried from the previous
//! snapshot where its block is unchanged.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;

use crate::compile::router::{Router, RouterBuilder, RouterError, ServerNameSpec};
use crate::config::model::{Config, Handler, Modifier, ServerName, Upstream};
use crate::proxy::balance::{Algorithm, PeerSpec, Peers};

/// Why a validated config could not be compiled (rare: the checker reports
/// nearly everything first).
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Router(#[from] RouterError),
    #[error("auth_jwt `{name}`: {source}")]
    Jwt {
        name: String,
        source: crate::policy::jwt::JwtError,
    },
    #[error("rate_limit `{name}`: {source}")]
    RateLimit {
        name: String,
        source: crate::policy::rate_limit::RateLimitError,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("upstream `{upstream}`: cannot resolve `{server}`: {reason}")]
    Resolve {
        upstream: String,
        server: String,
        reason: String,
    },
}

/// One upstream block, compiled: its servers' addresses and balancing state.
#[derive(Debug)]
pub struct UpstreamPool {
    pub name: String,
    /// Resolved address of each server, index = peer index; re-resolved in
    /// place for `resolve` servers.
    pub addrs: Vec<arc_swap::ArcSwap<SocketAddr>>,
    /// `host:port` as written, sent as `Host` (index = peer index).
    pub hosts: Vec<String>,
    /// The same as `Host` header values, built once.
    pub host_values: Vec<Option<http::HeaderValue>>,
    /// How active health checks reach the servers: over TLS (with this
    /// trust) when every `proxy_pass` and aggregate call to the upstream
    /// says `https://`, plain HTTP otherwise.
    pub probe_tls: Option<Arc<crate::tls::UpstreamTrust>>,
    pub peers: Peers,
    /// The block as validated, to decide whether state carries over.
    pub def: Upstream,
    /// Health-check and re-resolve tasks, stopped when the pool is dropped
    /// (after the last request of its generation ends).
    pub tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl UpstreamPool {
    /// The current address of peer `i`.
    pub fn addr(&self, i: usize) -> Option<SocketAddr> {
        self.addrs.get(i).map(|a| **a.load())
    }
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

/// Precomputed labels of one server (for logs and metrics).
#[derive(Debug)]
pub struct ServerLabels {
    pub server: Arc<str>,
    pub routes: Vec<Arc<str>>,
}

/// The running config.
#[derive(Debug)]
pub struct Gateway {
    pub generation: u64,
    pub loaded_at: std::time::SystemTime,
    pub config: Arc<Config>,
    pub router: Router,
    /// Index = index in `config.upstreams`.
    pub upstreams: Vec<Arc<UpstreamPool>>,
    /// Index = index in `config.jwt`.
    pub jwt: Vec<Arc<crate::policy::jwt::JwtVerifier>>,
    /// Index = index in `config.rate_limits`; counters outlive a reload
    /// when the block is unchanged (they live in [`RATE_LIMITS`]).
    pub limiters: Vec<Arc<crate::policy::rate_limit::Limiter>>,
    /// Index = index in `config.caches`; contents outlive a reload when the
    /// block is unchanged (they live in [`CACHES`]).
    pub caches: Vec<Arc<crate::policy::cache::Cache>>,
    pub started: Instant,
    /// Per server: its label and its locations' `route` labels, built once
    /// so that logging and metrics format nothing per request.
    pub labels: Vec<ServerLabels>,
    /// Listener certificates and upstream trust, read at (re)load.
    pub tls: crate::tls::GatewayTls,
    /// The default `request_id_header`, parsed once (looking a header up
    /// by its text parses the name on every request).
    pub request_id_name: Option<http::HeaderName>,
    /// Some access log writes the combined format, the one that shows the
    /// client's `User-Agent` and `Referer` (taken per request only then).
    pub logs_client_headers: bool,
    /// Some access log is on (either format): a request's URI is kept
    /// for its line (a reference-counted clone, ~70 instructions a
    /// request otherwise spent for nothing).
    pub logs_requests: bool,
}

/// The TLS an upstream's health checks use: the first `https` location's
/// trust when every reference to the upstream (`proxy_pass`, aggregate
/// calls) is `https`; `None` (plain HTTP) when any is plain or none exists.
fn probe_tls(
    config: &Config,
    tls: &crate::tls::GatewayTls,
    upstream: usize,
) -> Option<Arc<crate::tls::UpstreamTrust>> {
    use crate::config::model::ProxyTarget;
    let mut trust = None;
    for l in config.servers.iter().flat_map(|s| &s.locations) {
        let ours = |t: &ProxyTarget| matches!(t, ProxyTarget::Upstream(i) if *i == upstream);
        let refs: Vec<bool> = match &l.handler {
            Handler::Proxy(p) if ours(&p.target) => vec![p.tls],
            Handler::Aggregate(a) => a
                .calls
                .iter()
                .filter(|c| ours(&c.target))
                .map(|c| c.tls)
                .collect(),
            _ => Vec::new(),
        };
        for https in refs {
            if !https {
                return None;
            }
            if trust.is_none() {
                trust = Some(tls.trust_for(&l.settings));
            }
        }
    }
    trust
}

pub fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    (h, port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "no address".to_string())
}

/// Rate-limit counters of the process, shared by every snapshot: an
/// unchanged `rate_limit` block finds its limiter again after a reload.
pub static RATE_LIMITS: std::sync::LazyLock<crate::policy::rate_limit::RateLimitStore> =
    std::sync::LazyLock::new(crate::policy::rate_limit::RateLimitStore::new);

fn same_jwt(a: &crate::config::model::JwtDef, b: &crate::config::model::JwtDef) -> bool {
    let strip = |d: &crate::config::model::JwtDef| crate::config::model::JwtDef {
        span: Default::default(),
        ..d.clone()
    };
    strip(a) == strip(b)
}

/// Response caches of the process, shared by every snapshot.
pub static CACHES: std::sync::LazyLock<crate::policy::cache::CacheRegistry> =
    std::sync::LazyLock::new(crate::policy::cache::CacheRegistry::new);

/// Compile a validated config into a snapshot. `previous` lends upstream
/// health state for unchanged blocks.
pub fn compile(
    config: Config,
    generation: u64,
    previous: Option<&Gateway>,
) -> Result<Gateway, CompileError> {
    let mut b = RouterBuilder::new();
    for s in &config.servers {
        let listens: Vec<(SocketAddr, bool)> = s
            .listens
            .iter()
            .map(|l| (l.addr, l.default_server))
            .collect();
        let mut names: Vec<ServerNameSpec> = s
            .names
            .iter()
            .map(|n| match n {
                ServerName::Exact(x) => ServerNameSpec::Exact(x.clone()),
                ServerName::LeadingWildcard(x) => ServerNameSpec::LeadingWildcard(x.clone()),
                ServerName::TrailingWildcard(x) => ServerNameSpec::TrailingWildcard(x.clone()),
                ServerName::Regex(r) => ServerNameSpec::Regex(r.clone()),
            })
            .collect();
        if names.is_empty() {
            names.push(ServerNameSpec::Exact(String::new()));
        }
        let si = b.server(&listens, &names);
        for l in &s.locations {
            let slash_redirect = matches!(l.modifier, Modifier::Prefix | Modifier::PrefixNoRegex)
                && l.pattern.ends_with('/')
                && l.pattern.len() > 1
                && matches!(l.handler, Handler::Proxy(_));
            b.location(si, l.modifier, &l.pattern, slash_redirect)?;
        }
    }
    let router = b.build()?;
    let tls = crate::tls::GatewayTls::load(&config)?;
    let mut upstreams = Vec::new();
    for (i, u) in config.upstreams.iter().enumerate() {
        let mut addrs = Vec::new();
        for s in &u.servers {
            let a = resolve(&s.host, s.port).map_err(|reason| CompileError::Resolve {
                upstream: u.name.clone(),
                server: s.address.clone(),
                reason,
            })?;
            addrs.push(arc_swap::ArcSwap::from_pointee(a));
        }
        let prev = previous
            .and_then(|p| p.upstreams.iter().find(|x| x.name == u.name))
            .map(|p| &p.peers);
        let peers = Peers::new_with_state(
            u.servers.iter().map(PeerSpec::from),
            Algorithm::from(&u.balance),
            prev,
        );
        upstreams.push(Arc::new(UpstreamPool {
            name: u.name.clone(),
            hosts: u.servers.iter().map(|s| s.address.clone()).collect(),
            host_values: u
                .servers
                .iter()
                .map(|s| http::HeaderValue::try_from(s.address.as_str()).ok())
                .collect(),
            probe_tls: probe_tls(&config, &tls, i),
            addrs,
            peers,
            def: u.clone(),
            tasks: std::sync::Mutex::new(Vec::new()),
        }));
    }
    let mut jwt = Vec::new();
    for def in &config.jwt {
        // An unchanged block keeps its verifier (keys, remembered tokens).
        let same = previous.and_then(|p| {
            p.config
                .jwt
                .iter()
                .position(|d| same_jwt(d, def))
                .and_then(|i| p.jwt.get(i).cloned())
        });
        let v = match same {
            Some(v) => v,
            None => Arc::new(crate::policy::jwt::JwtVerifier::new(def).map_err(|source| {
                CompileError::Jwt {
                    name: def.name.clone(),
                    source,
                }
            })?),
        };
        jwt.push(v);
    }
    let mut limiters = Vec::new();
    for def in &config.rate_limits {
        limiters.push(
            RATE_LIMITS
                .get(def)
                .map_err(|source| CompileError::RateLimit {
                    name: def.name.clone(),
                    source,
                })?,
        );
    }
    let caches = config
        .caches
        .iter()
        .map(|d| CACHES.get_or_create(d))
        .collect();
    let labels = (0..config.servers.len())
        .map(|i| ServerLabels {
            server: Arc::from(crate::routes::server_label(&config, i)),
            routes: config.servers[i]
                .locations
                .iter()
                .map(|l| Arc::from(l.route.as_str()))
                .collect(),
        })
        .collect();
    let request_id_name =
        http::HeaderName::try_from(config.defaults.request_id_header.as_str()).ok();
    let combined = |l: &crate::config::model::AccessLog| {
        matches!(
            l,
            crate::config::model::AccessLog::On {
                format: crate::config::model::AccessLogFormat::Combined,
                ..
            }
        )
    };
    let any = |f: &dyn Fn(&crate::config::model::AccessLog) -> bool| {
        f(&config.defaults.access_log)
            || config.servers.iter().any(|s| {
                f(&s.settings.access_log) || s.locations.iter().any(|l| f(&l.settings.access_log))
            })
    };
    let logs_client_headers = any(&combined);
    let logs_requests = any(&|l| matches!(l, crate::config::model::AccessLog::On { .. }));
    Ok(Gateway {
        request_id_name,
        logs_client_headers,
        logs_requests,
        labels,
        jwt,
        limiters,
        caches,
        generation,
        loaded_at: std::time::SystemTime::now(),
        config: Arc::new(config),
        router,
        upstreams,
        started: previous.map(|p| p.started).unwrap_or_else(Instant::now),
        tls,
    })
}

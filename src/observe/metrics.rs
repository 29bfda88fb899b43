//! Prometheus metrics (LANGUAGE.md §10), exposed on the admin listener.
//!
//! Label sets are bounded: `route` is the location as written (or `none`),
//! never the raw path; `status` is the numeric code. Families are created
//! once; a request touches atomics behind a read-mostly family lookup.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
    pub server: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub upstream: String,
    pub server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub cache: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub policy: String,
    pub reason: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs … 30 s, roughly ×2.5 per bucket.
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0,
    ])
}

/// Every metric of the process.
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub upstream_up: Family<ServerLabels, Gauge>,
    /// Requests in flight to each server (the connections of its pool in use).
    pub upstream_active: Family<ServerLabels, Gauge>,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub cache_requests: Family<CacheLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub auth_failures: Family<ReasonLabels, Counter>,
    pub connections_active: Gauge,
    pub config_generation: Gauge,
    pub access_log_dropped: Counter,
    /// Times freed memory was given back to the system after a burst.
    pub memory_trims: Counter,
    /// Resident bytes those trims gave back.
    pub memory_released: Counter,
    #[cfg(feature = "otlp")]
    pub otlp_spans_dropped: Counter,
    registry: Registry,
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            upstream_requests: Family::default(),
            upstream_up: Family::default(),
            upstream_active: Family::default(),
            rate_limited: Family::default(),
            cache_requests: Family::default(),
            reloads: Family::default(),
            auth_failures: Family::default(),
            connections_active: Gauge::default(),
            config_generation: Gauge::default(),
            access_log_dropped: Counter::default(),
            memory_trims: Counter::default(),
            memory_released: Counter::default(),
            #[cfg(feature = "otlp")]
            otlp_spans_dropped: Counter::default(),
            registry: Registry::default(),
        };
        let mut r = Registry::default();
        r.register(
            "gateway_requests",
            "Requests served, by route, method and status",
            m.requests.clone(),
        );
        r.register(
            "gateway_request_duration_seconds",
            "Request duration, by route",
            m.duration.clone(),
        );
        r.register(
            "gateway_upstream_requests",
            "Requests sent upstream, by upstream, server and status",
            m.upstream_requests.clone(),
        );
        r.register(
            "gateway_upstream_up",
            "1 when an upstream server is up",
            m.upstream_up.clone(),
        );
        r.register(
            "gateway_upstream_active_requests",
            "Requests in flight to an upstream server (pooled connections in use)",
            m.upstream_active.clone(),
        );
        r.register(
            "gateway_rate_limited",
            "Requests rejected by a rate limit",
            m.rate_limited.clone(),
        );
        r.register(
            "gateway_cache_requests",
            "Cache lookups, by cache and X-Cache-Status",
            m.cache_requests.clone(),
        );
        r.register(
            "gateway_config_reloads",
            "Config reloads, by result",
            m.reloads.clone(),
        );
        r.register(
            "gateway_auth_failures",
            "Authentication failures, by policy and reason",
            m.auth_failures.clone(),
        );
        r.register(
            "gateway_connections_active",
            "Open client connections",
            m.connections_active.clone(),
        );
        r.register(
            "gateway_config_generation",
            "The generation of the config being served",
            m.config_generation.clone(),
        );
        r.register(
            "gateway_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        r.register(
            "gateway_memory_trims",
            "Times the memory freed after a burst of requests was given back to the system",
            m.memory_trims.clone(),
        );
        r.register(
            "gateway_memory_released_bytes",
            "Resident bytes given back to the system after bursts",
            m.memory_released.clone(),
        );
        #[cfg(feature = "otlp")]
        r.register(
            "gateway_otlp_spans_dropped",
            "Spans not exported over OTLP: the exporter fell behind or the collector failed",
            m.otlp_spans_dropped.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

thread_local! {
    static UPSTREAM_COUNTERS: std::cell::RefCell<crate::FastMap<(u64, u16), Counter>> =
        std::cell::RefCell::new(crate::FastMap::default());
}

/// Count one upstream exchange without a lock or an allocation once the
/// (upstream, server, status) triple was seen on this thread.
pub fn count_upstream(upstream: &str, server: &str, status: u16) {
    use std::hash::BuildHasher;
    let key = (
        foldhash::fast::FixedState::default().hash_one((upstream, server)),
        status,
    );
    UPSTREAM_COUNTERS.with(|c| {
        c.borrow_mut()
            .entry(key)
            .or_insert_with(|| {
                METRICS
                    .upstream_requests
                    .get_or_create(&UpstreamLabels {
                        upstream: upstream.to_string(),
                        server: server.to_string(),
                        status,
                    })
                    .clone()
            })
            .inc();
    });
}

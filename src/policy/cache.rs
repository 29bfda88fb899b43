//! Response caching (LANGUAGE.md §8): a byte-bounded shared cache with
//! RFC 9111 storage rules, request coalescing, stale-while-revalidate and
//! stale-if-error.
//!
//! The pipeline renders the block's `key`, then hands the request head and a
//! [`Fetch`] (one upstream round trip) to [`Cache::serve`], which decides
//! everything else and answers with `X-Cache-Status` set. A
//! [`CacheRegistry`] outlives reloads so that an unchanged `cache` block keeps
//! its contents.
//!
//! # Decisions (where RFC 9111 leaves a choice or where we simplify)
//!
//! Statuses stored:
//! - with explicit freshness (`s-maxage`, `max-age`, `Expires`): 200, 203,
//!   204, 300, 301, 308, 404, 405, 410, 414, 501 (the heuristically
//!   cacheable set of RFC 9110 §15.1 without 206: we do not merge ranges);
//! - with only the block's `ttl`: 200, 203, 204, 300, 301, 308. An error
//!   status is pinned only when the upstream says for how long, so that a
//!   transient 404 during a deploy is not served for `ttl`.
//!
//! Freshness: `s-maxage` > `max-age` > `Expires − Date` (an invalid
//! `Expires` means already stale; no `Date` means "now") > `ttl`. The age is
//! the upstream's `Age` plus the time resident here (the `Date`-based
//! apparent age is not used: clocks between hosts disagree more often than
//! responses sit in queues).
//!
//! Not stored: response `no-store`, `private`, `no-cache` (we do no
//! conditional revalidation, so a response that must be revalidated on every
//! use is never useful), `Set-Cookie`, `Vary: *`, a status outside the sets
//! above, a body over `max_entry_size`, a response whose freshness and stale
//! windows are all zero. `must-revalidate`/`proxy-revalidate` switch off the
//! stale windows for that response. `s-maxage` does *not* imply
//! `proxy-revalidate` here: the operator asked for stale serving explicitly.
//!
//! Request directives: `no-store` → BYPASS (not looked up, not stored, not
//! coalesced); `no-cache`, `max-age=0` or `Pragma: no-cache` (without
//! `Cache-Control`) → the stored response is not used: the request fetches
//! (coalesced with concurrent ones) and its response replaces the entry
//! (status EXPIRED when an entry existed, MISS otherwise). Other request
//! directives (`max-stale`, `min-fresh`, `only-if-cached`) are ignored.
//!
//! `Authorization`: a stored response is served to such a request only when
//! it was `public` or had `s-maxage`; otherwise the request fetches and its
//! response is stored only when `public`/`s-maxage` — if it is not, the
//! status is BYPASS.
//!
//! HEAD is answered from a stored GET response (no body, same
//! `Content-Length`); a HEAD miss fetches through and is never stored nor
//! coalesced (its empty body must not become the GET entry).
//!
//! `X-Cache-Status` (also in the response extensions as [`CacheStatus`]):
//! - `HIT`: fresh stored response, or answered from a concurrent request's
//!   fetch (coalescing: one MISS upstream, the others HIT);
//! - `MISS`: nothing stored; fetched;
//! - `EXPIRED`: stored but expired (or refused by request `no-cache`); fetched;
//! - `STALE`: the fetch failed (error, timeout, 500/502/503/504) and a stale
//!   response within `stale_if_error` was served instead;
//! - `UPDATING`: stale within `stale_while_revalidate`, served at once while
//!   one background fetch refreshes the entry;
//! - `BYPASS`: the request is not cacheable (method not listed, request
//!   `no-store`, `Authorization` without a `public`/`s-maxage` response).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use prometheus_client::metrics::counter::Counter;
use quick_cache::sync::{Cache as QuickCache, DefaultLifecycle};
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::model::CacheDef;
use crate::config::source::Span;
use crate::observe::metrics::{CacheLabels, METRICS};
use crate::proxy::forward::{Body, BoxError, full_body};

/// One upstream round trip for the request being served. It may be called
/// more than once (a coalesced waiter falling back, a background refresh) and
/// from a spawned task, so it owns what it needs.
pub type Fetch = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Response<Body>, FetchError>> + Send>>
        + Send
        + Sync,
>;

/// The header every response of a cached location carries.
pub const X_CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache-status");
/// A stored map's spare entry: removed from each answer's copy, which
/// leaves room for one header added on the way out (`Stored::respond`).
const SPARE_SLOT: HeaderName = HeaderName::from_static("x-tollgate-spare-slot");

/// Statuses counted as upstream failure for `stale_if_error`.
const ERROR_STATUSES: [u16; 4] = [500, 502, 503, 504];
/// Stored when the upstream gives explicit freshness.
const EXPLICIT_STATUSES: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];
/// Stored for the block's `ttl` when the upstream gives no freshness.
const TTL_STATUSES: [u16; 6] = [200, 203, 204, 300, 301, 308];
/// RFC 9111 §1.2.2: delta-seconds past 2^31 are taken as 2^31.
const MAX_DELTA: u64 = 1 << 31;

/// The `X-Cache-Status` of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    Hit,
    Miss,
    Expired,
    Stale,
    Updating,
    Bypass,
}

impl CacheStatus {
    pub const ALL: [CacheStatus; 6] = [
        CacheStatus::Hit,
        CacheStatus::Miss,
        CacheStatus::Expired,
        CacheStatus::Stale,
        CacheStatus::Updating,
        CacheStatus::Bypass,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Expired => "EXPIRED",
            CacheStatus::Stale => "STALE",
            CacheStatus::Updating => "UPDATING",
            CacheStatus::Bypass => "BYPASS",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a [`Fetch`] produced no response: the status the gateway answers
/// with (502, 503, 504, …) and the short text of its JSON error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    pub status: StatusCode,
    pub message: String,
    /// Put in the error body as `request_id` when set (LANGUAGE.md §4).
    pub request_id: Option<String>,
}

impl FetchError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> FetchError {
        FetchError {
            status,
            message: message.into(),
            request_id: None,
        }
    }

    pub fn with_request_id(mut self, id: impl Into<String>) -> FetchError {
        self.request_id = Some(id.into());
        self
    }

    /// `{"error": "...", "status": N[, "request_id": "..."]}`
    pub fn to_response(&self) -> Response<Body> {
        let mut body = serde_json::json!({"error": self.message, "status": self.status.as_u16()});
        if let (Some(id), Some(obj)) = (&self.request_id, body.as_object_mut()) {
            obj.insert("request_id".into(), id.clone().into());
        }
        let mut resp = Response::new(full_body(body.to_string()));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

// ------------------------------------------------------------------ registry

/// The caches of every generation of the config, keyed by their block's
/// settings (not its span): a reload that leaves a block unchanged gets the
/// same [`Cache`] back, a changed block gets a fresh one.
#[derive(Default)]
pub struct CacheRegistry {
    caches: Mutex<HashMap<CacheDef, Arc<Cache>>>,
}

impl CacheRegistry {
    pub fn new() -> CacheRegistry {
        CacheRegistry::default()
    }

    /// The cache for this block, created empty when no block with the same
    /// settings exists.
    pub fn get_or_create(&self, def: &CacheDef) -> Arc<Cache> {
        let id = identity(def);
        lock(&self.caches)
            .entry(id)
            .or_insert_with(|| Cache::new(def))
            .clone()
    }

    /// Drop the caches of blocks not in `defs` (call after a reload has
    /// been compiled; snapshots still serving keep their `Arc`s).
    pub fn retain(&self, defs: &[CacheDef]) {
        let keep: Vec<CacheDef> = defs.iter().map(identity).collect();
        lock(&self.caches).retain(|id, _| keep.contains(id));
    }

    pub fn len(&self) -> usize {
        lock(&self.caches).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn identity(def: &CacheDef) -> CacheDef {
    CacheDef {
        span: Span::default(),
        ..def.clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ------------------------------------------------------------------- entries

/// A stored response. Immutable once built; expiry lives here (quick_cache
/// has no TTL), checked on lookup.
struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored_at: Instant,
    /// The upstream's `Age` when it arrived.
    initial_age: Duration,
    fresh_until: Instant,
    swr_until: Instant,
    sie_until: Instant,
    /// The request header values the response varies on (name, joined values).
    vary: Box<[(HeaderName, Option<Bytes>)]>,
    /// `public` or `s-maxage`: may answer a request with `Authorization`.
    shareable_with_auth: bool,
    weight: u64,
}

impl Stored {
    fn matches(&self, req: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| joined(req, name).as_ref() == value.as_ref())
    }

    fn usable_for(&self, req: &HeaderMap, auth: bool) -> bool {
        (!auth || self.shareable_with_auth) && self.matches(req)
    }

    fn respond(&self, now: Instant, head: bool) -> Response<Body> {
        let body = if head || self.body.is_empty() {
            Body::new(Empty::new().map_err(|never| match never {}))
        } else {
            full_body(self.body.clone())
        };
        // A clone of the stored map (its table copied, no name hashed
        // again). A clone's entries have no spare room, and `reserve`
        // only grows the index table, so a new name would reallocate the
        // entries: the stored map holds `Age` and `X-Cache-Status` already
        // (their values replaced here and by `serve_with`), and one spare
        // entry whose removal leaves room for the request id.
        let mut headers = self.headers.clone();
        headers.remove(&SPARE_SLOT);
        let age = self.initial_age + now.saturating_duration_since(self.stored_at);
        headers.insert(header::AGE, age_value(age.as_secs()));
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.headers_mut() = headers;
        resp
    }
}

/// An `Age` value; the first minute's without an allocation.
fn age_value(secs: u64) -> HeaderValue {
    const SMALL: usize = 60;
    static AGES: std::sync::LazyLock<Vec<HeaderValue>> =
        std::sync::LazyLock::new(|| (0..SMALL as u64).map(HeaderValue::from).collect());
    match usize::try_from(secs) {
        Ok(i) if i < SMALL => AGES[i].clone(),
        _ => HeaderValue::from(secs),
    }
}

/// What a key maps to: a response, or (for a response with `Vary`) the
/// header names whose values pick the variant, stored under
/// `key \0 value \0 value…`.
#[derive(Clone)]
enum Slot {
    Resp(Arc<Stored>),
    Vary(Arc<[HeaderName]>),
}

/// Bytes of body, headers and key.
#[derive(Clone)]
struct SlotWeighter;

impl Weighter<String, Slot> for SlotWeighter {
    fn weight(&self, key: &String, val: &Slot) -> u64 {
        let v = match val {
            Slot::Resp(s) => s.weight,
            Slot::Vary(names) => names.iter().map(|n| n.as_str().len() as u64).sum(),
        };
        (key.len() as u64 + v).max(1)
    }
}

/// How a coalesced fetch ended, for its waiters.
#[derive(Clone)]
enum Outcome {
    /// Stored: answer from it if it matches (Vary, Authorization).
    Stored(Arc<Stored>),
    /// A response that was not stored: fetch your own.
    NotShared,
    /// The upstream failed: serve stale if allowed, else fetch your own.
    Failed,
}

type FlightMap = HashMap<String, (u64, watch::Receiver<Option<Outcome>>)>;

/// The leader's side of a coalesced fetch: waiters are released with its
/// outcome, or with [`Outcome::NotShared`] when it is dropped unfinished
/// (client gone, body abandoned).
struct Flight {
    cache: Arc<Cache>,
    key: String,
    id: u64,
    tx: watch::Sender<Option<Outcome>>,
    done: bool,
}

impl Flight {
    fn finish(mut self, outcome: Outcome) {
        self.complete(outcome);
    }

    fn complete(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        {
            let mut map = lock(&self.cache.inflight);
            if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
                map.remove(&self.key);
            }
        }
        self.tx.send_replace(Some(outcome));
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.complete(Outcome::NotShared);
    }
}

enum Role {
    Leader(Flight),
    Waiter(watch::Receiver<Option<Outcome>>),
}

/// What the request asked of the cache.
#[derive(Default)]
struct RequestDirectives {
    no_cache: bool,
    no_store: bool,
}

impl RequestDirectives {
    fn parse(h: &HeaderMap) -> RequestDirectives {
        let mut d = RequestDirectives::default();
        for_each_directive(h, header::CACHE_CONTROL, |name, value| {
            if name.eq_ignore_ascii_case("no-cache") {
                d.no_cache = true;
            } else if name.eq_ignore_ascii_case("no-store") {
                d.no_store = true;
            } else if name.eq_ignore_ascii_case("max-age")
                && value.is_some_and(|v| v.parse() == Ok(0u64))
            {
                d.no_cache = true;
            }
        });
        if !h.contains_key(header::CACHE_CONTROL) {
            for_each_directive(h, header::PRAGMA, |name, _| {
                d.no_cache |= name.eq_ignore_ascii_case("no-cache");
            });
        }
        d
    }
}

/// The response's `Cache-Control`; the first occurrence of a directive wins,
/// an unparsable delta is 0 (RFC 9111 §4.2.1: "considered stale").
#[derive(Default)]
struct ResponseDirectives {
    no_store: bool,
    no_cache: bool,
    private: bool,
    public: bool,
    must_revalidate: bool,
    max_age: Option<u64>,
    s_maxage: Option<u64>,
}

impl ResponseDirectives {
    fn parse(h: &HeaderMap) -> ResponseDirectives {
        let mut d = ResponseDirectives::default();
        let delta = |v: Option<&str>| {
            v.and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                .min(MAX_DELTA)
        };
        for_each_directive(h, header::CACHE_CONTROL, |name, value| {
            let n = name.to_ascii_lowercase();
            match n.as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "max-age" if d.max_age.is_none() => d.max_age = Some(delta(value)),
                "s-maxage" if d.s_maxage.is_none() => d.s_maxage = Some(delta(value)),
                _ => {}
            }
        });
        d
    }
}

/// Calls `f(name, value)` for each directive of every `name` header line,
/// splitting on commas outside quoted strings.
fn for_each_directive(h: &HeaderMap, name: HeaderName, mut f: impl FnMut(&str, Option<&str>)) {
    let mut one = |part: &str| {
        let part = part.trim();
        if part.is_empty() {
            return;
        }
        match part.split_once('=') {
            Some((n, v)) => f(n.trim(), Some(v.trim().trim_matches('"'))),
            None => f(part, None),
        }
    };
    for v in h.get_all(name) {
        let Ok(s) = v.to_str() else { continue };
        let (mut start, mut quoted, mut escaped) = (0, false, false);
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    one(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        one(&s[start..]);
    }
}

/// The values of a request header, joined with ", " (several lines are one
/// list, RFC 9110 §5.3).
fn joined(h: &HeaderMap, name: &HeaderName) -> Option<Bytes> {
    let mut it = h.get_all(name).iter();
    let first = it.next()?;
    let mut out = BytesMut::from(first.as_bytes());
    for v in it {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(out.freeze())
}

/// `None` for `Vary: *` (or a name that is no header name): not storable.
fn vary_names(h: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names: Vec<HeaderName> = Vec::new();
    for v in h.get_all(header::VARY) {
        let s = v.to_str().ok()?;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part == "*" {
                return None;
            }
            let n = HeaderName::try_from(part).ok()?;
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    Some(names)
}

fn variant_key(key: &str, names: &[HeaderName], req: &HeaderMap) -> String {
    let mut k = String::with_capacity(key.len() + 16 * names.len());
    k.push_str(key);
    for n in names {
        k.push('\0');
        if let Some(v) = joined(req, n) {
            k.push_str(&String::from_utf8_lossy(&v));
        }
    }
    k
}

fn header_seconds(h: &HeaderMap, name: HeaderName) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn header_date(h: &HeaderMap, name: HeaderName) -> Option<Option<SystemTime>> {
    let v = h.get(name)?;
    Some(
        v.to_str()
            .ok()
            .and_then(|s| httpdate::parse_http_date(s.trim()).ok()),
    )
}

fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by)
        .or_else(|| at.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(at)
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The request had `Authorization` and the response is not `public`
    /// nor has `s-maxage`: the request was not cacheable (BYPASS).
    Authorization,
    /// The response says no, or is too large (MISS/EXPIRED); an older
    /// stored response must not outlive it.
    Response,
    /// 304 or 206: an answer to the client's conditional or range request
    /// that says nothing against the stored response.
    Partial,
}

/// Everything decided from the response head, before its body is read.
struct Plan {
    /// The key the response goes under (the variant key with `Vary`).
    store_key: String,
    /// The primary key and the `Vary` names, when the response varies.
    vary_marker: Option<(String, Arc<[HeaderName]>)>,
    vary: Box<[(HeaderName, Option<Bytes>)]>,
    status: StatusCode,
    headers: HeaderMap,
    initial_age: Duration,
    lifetime: Duration,
    allow_stale: bool,
    shareable_with_auth: bool,
    content_length: Option<u64>,
}

// --------------------------------------------------------------------- cache

/// One `cache` block's store. Cheap to share: `Arc<Cache>`.
pub struct Cache {
    def: CacheDef,
    methods: Vec<Method>,
    store: QuickCache<String, Slot, SlotWeighter, DefaultHashBuilder>,
    inflight: Mutex<FlightMap>,
    next_flight: AtomicU64,
    counters: [Counter; 6],
}

/// What one `serve` call knows about its request.
struct Ctx<'a> {
    key: &'a str,
    flight_key: &'a str,
    req: &'a http::request::Parts,
    auth: bool,
    head: bool,
    found: Option<Arc<Stored>>,
    base: CacheStatus,
    fetch: &'a Fetch,
}

impl Cache {
    /// An empty cache for `def`. Prefer [`CacheRegistry::get_or_create`],
    /// which keeps contents across reloads.
    pub fn new(def: &CacheDef) -> Arc<Cache> {
        let max = def.max_size.max(1);
        let entry = def.max_entry_size.clamp(1, max);
        // Each shard holds 1/shards of the bytes and refuses an item over
        // ~97% of its share: keep the shards big enough for two largest
        // entries. The capacity is a multiple of the shard count so that the
        // shards' shares add up to no more than `max_size`.
        let parallel = std::thread::available_parallelism().map_or(4, |n| n.get() * 4);
        let mut shards = (parallel as u64).next_power_of_two();
        while shards > 1 && max / shards < entry.saturating_mul(2) {
            shards /= 2;
        }
        let capacity = max - max % shards;
        let items = (max / 4096).clamp(64, 1 << 20) as usize;
        let store = match OptionsBuilder::new()
            .shards(shards as usize)
            .estimated_items_capacity(items)
            .weight_capacity(capacity)
            .build()
        {
            Ok(options) => QuickCache::with_options(
                options,
                SlotWeighter,
                // foldhash::quality::RandomState behind this name: a random
                // seed per process, so clients cannot aim keys at one bucket.
                DefaultHashBuilder::default(),
                DefaultLifecycle::default(),
            ),
            // Unreachable (both required options are set); a cache of
            // default shape is still correct.
            Err(_) => QuickCache::with(
                items,
                capacity,
                SlotWeighter,
                DefaultHashBuilder::default(),
                DefaultLifecycle::default(),
            ),
        };
        let counters = CacheStatus::ALL.map(|s| {
            METRICS
                .cache_requests
                .get_or_create(&CacheLabels {
                    cache: def.name.clone(),
                    status: s.as_str().to_string(),
                })
                .clone()
        });
        Arc::new(Cache {
            def: def.clone(),
            methods: def
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            store,
            inflight: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(0),
            counters,
        })
    }

    pub fn name(&self) -> &str {
        &self.def.name
    }

    pub fn def(&self) -> &CacheDef {
        &self.def
    }

    /// Total weight held (bytes of bodies, headers and keys); never above
    /// `max_size`.
    pub fn weight(&self) -> u64 {
        self.store.weight()
    }

    /// Entries held (responses and `Vary` markers).
    pub fn len(&self) -> usize {
        self.store.len()
    }

    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Remove the responses stored under `key` (all its `Vary` variants), or
    /// everything; returns how many responses were removed.
    pub fn purge(&self, key: Option<&str>) -> usize {
        let removed = AtomicUsize::new(0);
        self.store.retain(|k, v| {
            let hit = match key {
                None => true,
                Some(key) => k
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('\0')),
            };
            if hit && matches!(v, Slot::Resp(_)) {
                removed.fetch_add(1, Ordering::Relaxed);
            }
            !hit
        });
        removed.into_inner()
    }

    /// Answer a request of a cached location: from the store, from a
    /// concurrent request's fetch, or by calling `fetch` (at most once
    /// here, plus at most one background refresh). Every answer carries
    /// `X-Cache-Status` and the [`CacheStatus`] extension; a fetch error
    /// with nothing stale to serve becomes [`FetchError::to_response`].
    pub async fn serve(
        self: &Arc<Self>,
        key: String,
        req: &http::request::Parts,
        fetch: Fetch,
    ) -> Response<Body> {
        let (status, mut resp) = self.serve_with(key, req, move || fetch).await;
        resp.extensions_mut().insert(status);
        resp
    }

    /// [`Cache::serve`] with the fetch built only when it is needed: a
    /// fresh hit never builds it (preparing the upstream request is most
    /// of a hit's cost otherwise). The status comes back beside the
    /// response (with `X-Cache-Status` set), not as an extension: an
    /// extension is a map of its own, allocated and freed per response.
    pub async fn serve_with(
        self: &Arc<Self>,
        key: String,
        req: &http::request::Parts,
        make_fetch: impl FnOnce() -> Fetch,
    ) -> (CacheStatus, Response<Body>) {
        let (status, mut resp) = self.decide(&key, req, make_fetch).await;
        self.counters[status.index()].inc();
        resp.headers_mut()
            .insert(X_CACHE_STATUS, HeaderValue::from_static(status.as_str()));
        (status, resp)
    }

    async fn decide(
        self: &Arc<Self>,
        key: &str,
        req: &http::request::Parts,
        make_fetch: impl FnOnce() -> Fetch,
    ) -> (CacheStatus, Response<Body>) {
        let directives = RequestDirectives::parse(&req.headers);
        if !self.methods.contains(&req.method) || directives.no_store {
            return match make_fetch()().await {
                Ok(resp) => (CacheStatus::Bypass, resp),
                Err(e) => (CacheStatus::Bypass, e.to_response()),
            };
        }
        let now = Instant::now();
        let head = req.method == Method::HEAD;
        let auth = req.headers.contains_key(header::AUTHORIZATION);
        let (found, variant_key) = self.lookup(key, &req.headers);
        let flight_key = variant_key.as_deref().unwrap_or(key);
        let found = found.filter(|e| !auth || e.shareable_with_auth);
        if let Some(e) = &found
            && !directives.no_cache
            && now < e.fresh_until
        {
            return (CacheStatus::Hit, e.respond(now, head));
        }
        // Anything past a fresh hit may need the upstream.
        let fetch = &make_fetch();
        if let Some(e) = &found
            && !directives.no_cache
            && now < e.swr_until
            && !head
        {
            self.refresh_in_background(key, flight_key, req, auth, e, fetch);
            return (CacheStatus::Updating, e.respond(now, false));
        }
        let ctx = Ctx {
            key,
            flight_key,
            req,
            auth,
            head,
            base: if found.is_some() {
                CacheStatus::Expired
            } else {
                CacheStatus::Miss
            },
            found,
            fetch,
        };
        if head {
            return self.fetch_and_store(None, &ctx).await;
        }
        match self.join_or_lead(flight_key) {
            Role::Leader(flight) => self.fetch_and_store(Some(flight), &ctx).await,
            Role::Waiter(mut rx) => {
                let outcome = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|o| o.clone());
                let now = Instant::now();
                match outcome {
                    Some(Outcome::Stored(e)) if e.usable_for(&req.headers, auth) => {
                        (CacheStatus::Hit, e.respond(now, false))
                    }
                    Some(Outcome::Failed) => match ctx.found.as_ref().filter(|e| now < e.sie_until)
                    {
                        Some(stale) => (CacheStatus::Stale, stale.respond(now, false)),
                        None => self.fetch_and_store(None, &ctx).await,
                    },
                    _ => self.fetch_and_store(None, &ctx).await,
                }
            }
        }
    }

    /// The stored response for this request (variant picked by `Vary`) and
    /// the key a fetch for it coalesces on.
    /// The variant's key is `None` when it is `key` itself (no `Vary`): a
    /// hit copies no key.
    fn lookup(&self, key: &str, req: &HeaderMap) -> (Option<Arc<Stored>>, Option<String>) {
        match self.store.get(key) {
            None => (None, None),
            Some(Slot::Resp(e)) => (e.matches(req).then_some(e), None),
            Some(Slot::Vary(names)) => {
                let vkey = variant_key(key, &names, req);
                match self.store.get(vkey.as_str()) {
                    Some(Slot::Resp(e)) if e.matches(req) => (Some(e), Some(vkey)),
                    _ => (None, Some(vkey)),
                }
            }
        }
    }

    fn join_or_lead(self: &Arc<Self>, flight_key: &str) -> Role {
        let mut map = lock(&self.inflight);
        if let Some((_, rx)) = map.get(flight_key) {
            return Role::Waiter(rx.clone());
        }
        Role::Leader(self.new_flight(&mut map, flight_key))
    }

    fn try_lead(self: &Arc<Self>, flight_key: &str) -> Option<Flight> {
        let mut map = lock(&self.inflight);
        if map.contains_key(flight_key) {
            return None;
        }
        Some(self.new_flight(&mut map, flight_key))
    }

    fn new_flight(self: &Arc<Self>, map: &mut FlightMap, flight_key: &str) -> Flight {
        let (tx, rx) = watch::channel(None);
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        map.insert(flight_key.to_string(), (id, rx));
        Flight {
            cache: Arc::clone(self),
            key: flight_key.to_string(),
            id,
            tx,
            done: false,
        }
    }

    /// One fetch; the response is stored when it may be (unless HEAD) and
    /// `flight`'s waiters get the outcome.
    async fn fetch_and_store(
        self: &Arc<Self>,
        flight: Option<Flight>,
        ctx: &Ctx<'_>,
    ) -> (CacheStatus, Response<Body>) {
        let result = (ctx.fetch)().await;
        let now = Instant::now();
        let stale = ctx.found.as_ref().filter(|e| now < e.sie_until);
        let finish = |flight: Option<Flight>, o: Outcome| {
            if let Some(f) = flight {
                f.finish(o);
            }
        };
        let resp = match result {
            Err(err) => {
                finish(flight, Outcome::Failed);
                return match stale {
                    Some(s) => (CacheStatus::Stale, s.respond(now, ctx.head)),
                    None => (ctx.base, err.to_response()),
                };
            }
            Ok(resp) => resp,
        };
        if ERROR_STATUSES.contains(&resp.status().as_u16()) {
            finish(flight, Outcome::Failed);
            return match stale {
                Some(s) => (CacheStatus::Stale, s.respond(now, ctx.head)),
                None => (ctx.base, resp),
            };
        }
        if ctx.head {
            finish(flight, Outcome::NotShared);
            return (ctx.base, resp);
        }
        match self.plan(
            resp.status(),
            resp.headers(),
            ctx.key,
            &ctx.req.headers,
            ctx.auth,
        ) {
            Err(refusal) => {
                finish(flight, Outcome::NotShared);
                match refusal {
                    Refusal::Authorization => return (CacheStatus::Bypass, resp),
                    Refusal::Response => self.forget(ctx.flight_key, ctx.found.as_ref()),
                    Refusal::Partial => {}
                }
                (ctx.base, resp)
            }
            Ok(plan) => (ctx.base, self.tee(resp, plan, flight)),
        }
    }

    /// Serve stale now; one spawned fetch refreshes the entry (none when a
    /// fetch for this key is already running).
    fn refresh_in_background(
        self: &Arc<Self>,
        key: &str,
        flight_key: &str,
        req: &http::request::Parts,
        auth: bool,
        stale: &Arc<Stored>,
        fetch: &Fetch,
    ) {
        let Some(flight) = self.try_lead(flight_key) else {
            return;
        };
        let (this, key, flight_key, headers, stale, fetch) = (
            Arc::clone(self),
            key.to_string(),
            flight_key.to_string(),
            req.headers.clone(),
            Arc::clone(stale),
            Arc::clone(fetch),
        );
        tokio::spawn(async move {
            let resp = match fetch().await {
                Ok(resp) if !ERROR_STATUSES.contains(&resp.status().as_u16()) => resp,
                _ => return flight.finish(Outcome::Failed),
            };
            let plan = match this.plan(resp.status(), resp.headers(), &key, &headers, auth) {
                Ok(plan) => plan,
                Err(refusal) => {
                    if refusal == Refusal::Response {
                        this.forget(&flight_key, Some(&stale));
                    }
                    return flight.finish(Outcome::NotShared);
                }
            };
            match read_limited(resp.into_body(), this.def.max_entry_size).await {
                Some(body) => {
                    let stored = this.insert(plan, body);
                    flight.finish(Outcome::Stored(stored));
                }
                None => flight.finish(Outcome::NotShared),
            }
        });
    }

    /// A refetched response may not be stored: the old one must not be
    /// served stale in its place.
    fn forget(&self, flight_key: &str, old: Option<&Arc<Stored>>) {
        if let Some(old) = old {
            self.store.remove_if(
                flight_key,
                |v| matches!(v, Slot::Resp(s) if Arc::ptr_eq(s, old)),
            );
        }
    }

    /// RFC 9111 §3 storage decision and §4.2.1 freshness, from the head.
    fn plan(
        &self,
        status: StatusCode,
        h: &HeaderMap,
        key: &str,
        req: &HeaderMap,
        auth: bool,
    ) -> Result<Plan, Refusal> {
        let cc = ResponseDirectives::parse(h);
        if auth && !(cc.public || cc.s_maxage.is_some()) {
            return Err(Refusal::Authorization);
        }
        if cc.no_store || cc.private || cc.no_cache || h.contains_key(header::SET_COOKIE) {
            return Err(Refusal::Response);
        }
        let names = vary_names(h).ok_or(Refusal::Response)?;
        let explicit = match (cc.s_maxage, cc.max_age) {
            (Some(s), _) => Some(s),
            (None, Some(m)) => Some(m),
            (None, None) => header_date(h, header::EXPIRES).map(|expires| {
                let date = header_date(h, header::DATE)
                    .flatten()
                    .unwrap_or_else(SystemTime::now);
                expires
                    .and_then(|e| e.duration_since(date).ok())
                    .map_or(0, |d| d.as_secs().min(MAX_DELTA))
            }),
        };
        let code = status.as_u16();
        if code == 304 || code == 206 {
            return Err(Refusal::Partial);
        }
        let lifetime = match explicit {
            Some(secs) if EXPLICIT_STATUSES.contains(&code) => Duration::from_secs(secs),
            None if TTL_STATUSES.contains(&code) => self.def.ttl,
            _ => return Err(Refusal::Response),
        };
        let allow_stale = !cc.must_revalidate;
        let windows = if allow_stale {
            self.def.stale_while_revalidate.max(self.def.stale_if_error)
        } else {
            Duration::ZERO
        };
        if lifetime.is_zero() && windows.is_zero() {
            return Err(Refusal::Response);
        }
        let content_length = header_seconds(h, header::CONTENT_LENGTH);
        if content_length.is_some_and(|n| n > self.def.max_entry_size) {
            return Err(Refusal::Response);
        }
        let (store_key, vary_marker) = if names.is_empty() {
            (key.to_string(), None)
        } else {
            (
                variant_key(key, &names, req),
                Some((key.to_string(), Arc::from(names.as_slice()))),
            )
        };
        let vary = names.iter().map(|n| (n.clone(), joined(req, n))).collect();
        Ok(Plan {
            store_key,
            vary_marker,
            vary,
            status,
            headers: h.clone(),
            initial_age: Duration::from_secs(
                header_seconds(h, header::AGE).unwrap_or(0).min(MAX_DELTA),
            ),
            lifetime,
            allow_stale,
            shareable_with_auth: cc.public || cc.s_maxage.is_some(),
            content_length,
        })
    }

    /// Stream the body to the client, keeping a copy while it stays under
    /// `max_entry_size`; store it when it ends.
    fn tee(
        self: &Arc<Self>,
        resp: Response<Body>,
        plan: Plan,
        flight: Option<Flight>,
    ) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        if body.is_end_stream() {
            // hyper never polls a body that says it is done.
            let stored = self.insert(plan, Bytes::new());
            if let Some(f) = flight {
                f.finish(Outcome::Stored(stored));
            }
            return Response::from_parts(parts, body);
        }
        let limit = self.def.max_entry_size;
        let sink = Sink {
            cache: Arc::clone(self),
            buf: BytesMut::with_capacity(plan.content_length.unwrap_or(0).min(limit) as usize),
            plan,
            flight,
            limit,
        };
        Response::from_parts(
            parts,
            Body::new(Tee {
                inner: body,
                sink: Some(sink),
            }),
        )
    }

    fn insert(&self, plan: Plan, body: Bytes) -> Arc<Stored> {
        let now = Instant::now();
        let mut headers = plan.headers;
        headers.remove(header::TRANSFER_ENCODING);
        headers.remove(header::AGE);
        headers.remove(X_CACHE_STATUS);
        if !(plan.status == StatusCode::NO_CONTENT || plan.status.is_informational()) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let header_bytes: usize = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        // Placeholders that `Stored::respond` and `serve_with` replace or
        // remove on every answer (see there).
        headers.insert(header::AGE, HeaderValue::from_static("0"));
        headers.insert(X_CACHE_STATUS, HeaderValue::from_static("HIT"));
        headers.insert(SPARE_SLOT, HeaderValue::from_static(""));
        let vary_bytes: usize = plan
            .vary
            .iter()
            .map(|(n, v)| n.as_str().len() + v.as_ref().map_or(0, Bytes::len))
            .sum();
        let fresh_until = later(now, plan.lifetime.saturating_sub(plan.initial_age));
        let (swr, sie) = if plan.allow_stale {
            (self.def.stale_while_revalidate, self.def.stale_if_error)
        } else {
            (Duration::ZERO, Duration::ZERO)
        };
        let stored = Arc::new(Stored {
            status: plan.status,
            weight: (body.len() + header_bytes + vary_bytes) as u64,
            headers,
            body,
            stored_at: now,
            initial_age: plan.initial_age,
            fresh_until,
            swr_until: later(fresh_until, swr),
            sie_until: later(fresh_until, sie),
            vary: plan.vary,
            shareable_with_auth: plan.shareable_with_auth,
        });
        if let Some((primary, names)) = plan.vary_marker {
            let same =
                matches!(self.store.peek(primary.as_str()), Some(Slot::Vary(n)) if n == names);
            if !same {
                self.store.insert(primary, Slot::Vary(names));
            }
        }
        self.store
            .insert(plan.store_key, Slot::Resp(Arc::clone(&stored)));
        stored
    }
}

/// The copy of a body being stored; dropped unfinished, it stores nothing
/// and its flight's waiters fetch their own.
struct Sink {
    cache: Arc<Cache>,
    plan: Plan,
    flight: Option<Flight>,
    buf: BytesMut,
    limit: u64,
}

impl Sink {
    fn finish(self) {
        let stored = self.cache.insert(self.plan, self.buf.freeze());
        if let Some(f) = self.flight {
            f.finish(Outcome::Stored(stored));
        }
    }
}

/// The upstream body on its way to the client, copied into a [`Sink`] until
/// it ends (stored) or outgrows the entry limit (copy dropped, streaming
/// goes on).
struct Tee {
    inner: Body,
    sink: Option<Sink>,
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(data), Some(sink)) = (f.data_ref(), this.sink.as_mut()) {
                    if sink.buf.len() as u64 + data.len() as u64 > sink.limit {
                        this.sink = None;
                    } else {
                        sink.buf.extend_from_slice(data);
                    }
                }
                if this.inner.is_end_stream()
                    && let Some(sink) = this.sink.take()
                {
                    sink.finish();
                }
            }
            Some(Err(_)) => this.sink = None,
            None => {
                if let Some(sink) = this.sink.take() {
                    sink.finish();
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The whole body when it ends within `limit` bytes.
async fn read_limited(mut body: Body, limit: u64) -> Option<Bytes> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if buf.len() as u64 + data.len() as u64 > limit {
                return None;
            }
            buf.extend_from_slice(&data);
        }
    }
    Some(buf.freeze())
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.name())
            .field("entries", &self.len())
            .field("weight", &self.weight())
            .finish()
    }
}

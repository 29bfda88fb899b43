//! Rate limiting (LANGUAGE.md §7, §13.8–13.9): GCRA, in memory or in Redis.
//!
//! Built once per `rate_limit` block (through [`RateLimitStore`], so an
//! unchanged block keeps its counters across a reload) and called by the
//! request pipeline after authentication, with the key already rendered.
//!
//! GCRA keeps one number per key, the theoretical arrival time (TAT). With
//! the emission interval `T = per / requests` and the tolerance
//! `τ = burst · T`, a request at `t` is admitted when `max(TAT, t) − t ≤ τ`,
//! and then `TAT = max(TAT, t) + T`. So `10r/s burst 5` admits 6 requests at
//! once and then one every 100 ms. The memory store and the Redis script do
//! this same arithmetic, and [`Gcra`] turns its outcome into the headers.
//!
//! The memory store is bounded by `max_keys`: it is a `quick_cache` (an
//! S3-FIFO-like policy: keys seen once go first, so a flood of new keys does
//! not push out the keys being limited), holding a 128-bit keyed hash of each
//! key (so a huge attacker-chosen key costs no more than a short one) and an
//! atomic TAT updated lock-free. A key that falls out starts afresh.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};

use crate::config::model::{Rate, RateLimitDef, RateStore, Template};

/// How long one Redis decision may take before it counts as a store error.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(150);

/// How far before its creation a memory limiter's clock starts.
const EPOCH_SLACK: Duration = Duration::from_secs(3600);

/// Why a `rate_limit` block could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("invalid redis URL `{url}`: {source}")]
    BadRedisUrl {
        url: String,
        #[source]
        source: redis::RedisError,
    },
}

// ---------------------------------------------------------------- decisions

/// What the store said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The store answered; the request is admitted or not.
    Counted(Verdict),
    /// The store could not answer in time: apply `on_store_error`
    /// (allow without rate-limit headers, or deny with 503).
    StoreError,
}

/// One admission decision and what the rate-limit headers say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// `RateLimit-Limit`: requests admitted at once from a full bucket (`burst + 1`).
    pub limit: u64,
    /// `RateLimit-Remaining`: requests that would be admitted right now after this one.
    pub remaining: u64,
    /// `RateLimit-Reset`: until the bucket is full again.
    pub reset_after: Duration,
    /// `Retry-After` of a refusal: until one more request would be admitted.
    pub retry_after: Option<Duration>,
}

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// A number as a header value in one allocation (`HeaderValue::from(u64)`
/// takes two: a growing buffer, then its shrink).
fn number(n: u64) -> HeaderValue {
    thread_local! {
        /// The last few numbers made on this thread: a route's limit and
        /// most resets repeat from one request to the next.
        static RECENT: std::cell::RefCell<[(u64, Option<HeaderValue>); 4]> =
            const { std::cell::RefCell::new([(0, None), (0, None), (0, None), (0, None)]) };
    }
    let made = || {
        // Cut from the thread's block of made values: no allocation each.
        crate::proxy::headers::made::generated(itoa::Buffer::new().format(n).as_bytes())
    };
    RECENT
        .try_with(|r| {
            let mut r = r.borrow_mut();
            if let Some((_, Some(v))) = r.iter().find(|(k, v)| *k == n && v.is_some()) {
                return v.clone();
            }
            let v = made();
            r.rotate_right(1);
            r[0] = (n, Some(v.clone()));
            v
        })
        .unwrap_or_else(|_| made())
}

/// Whole seconds, rounded up.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Verdict {
    /// Sets `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`
    /// (seconds, rounded up), and `Retry-After` (seconds, rounded up) on a
    /// refusal.
    pub fn write_headers(&self, headers: &mut http::HeaderMap) {
        self.write_to(&mut crate::proxy::headers::Added::Map(headers));
    }

    /// [`Verdict::write_headers`], to a map or behind passed-through lines.
    pub fn write_to(&self, out: &mut crate::proxy::headers::Added<'_>) {
        out.insert_number(&RATELIMIT_LIMIT, self.limit, number);
        out.insert_number(&RATELIMIT_REMAINING, self.remaining, number);
        out.insert_number(&RATELIMIT_RESET, ceil_secs(self.reset_after), number);
        if let Some(r) = self.retry_after {
            out.insert_number(&http::header::RETRY_AFTER, ceil_secs(r).max(1), number);
        }
    }

    /// Of several limits on one request, the one whose headers to send: the
    /// first refusal, else the one with the fewest remaining.
    pub fn most_restrictive(verdicts: impl IntoIterator<Item = Verdict>) -> Option<Verdict> {
        verdicts
            .into_iter()
            .reduce(|a, b| match (a.allowed, b.allowed) {
                (false, _) => a,
                (true, false) => b,
                (true, true) if b.remaining < a.remaining => b,
                _ => a,
            })
    }
}

/// The GCRA parameters of one block, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// `T`: one request's worth of time.
    pub interval: u64,
    /// `τ = burst · T`: how far ahead of now the TAT may run.
    pub tolerance: u64,
    pub limit: u64,
}

impl Gcra {
    pub fn new(rate: Rate, burst: u64) -> Gcra {
        let per = u64::try_from(rate.per.as_nanos()).unwrap_or(u64::MAX);
        let interval = (per / rate.requests.max(1)).max(1);
        Gcra {
            interval,
            tolerance: interval.saturating_mul(burst),
            limit: burst.saturating_add(1),
        }
    }

    /// Decides a request at `now` against `tat`; returns the verdict and the
    /// TAT to store when admitted.
    pub fn decide(&self, tat: u64, now: u64) -> (Verdict, Option<u64>) {
        let base = tat.max(now);
        let ahead = base - now;
        let allowed = ahead <= self.tolerance;
        let new_tat = allowed.then(|| base.saturating_add(self.interval));
        (self.verdict(ahead, allowed), new_tat)
    }

    /// The verdict for a request that found the TAT `ahead` ns past now.
    pub fn verdict(&self, ahead: u64, allowed: bool) -> Verdict {
        if allowed {
            Verdict {
                allowed,
                limit: self.limit,
                remaining: (self.tolerance - ahead) / self.interval,
                reset_after: Duration::from_nanos(ahead.saturating_add(self.interval)),
                retry_after: None,
            }
        } else {
            Verdict {
                allowed,
                limit: self.limit,
                remaining: 0,
                reset_after: Duration::from_nanos(ahead),
                retry_after: Some(Duration::from_nanos(ahead - self.tolerance)),
            }
        }
    }
}

// ---------------------------------------------------------------- memory

/// GCRA state per key in process memory, bounded by `max_keys`.
pub struct MemoryLimiter {
    gcra: Gcra,
    epoch: Instant,
    /// Keyed SipHash (a random key per limiter): a key's 128-bit id, so
    /// that no client can make its key share another's cell.
    hash: std::hash::RandomState,
    cells: quick_cache::sync::Cache<u128, Arc<AtomicU64>>,
}

impl MemoryLimiter {
    pub fn new(def: &RateLimitDef) -> MemoryLimiter {
        let max_keys = usize::try_from(def.max_keys.max(1)).unwrap_or(usize::MAX);
        MemoryLimiter {
            gcra: Gcra::new(def.rate, def.burst),
            // Set in the past so that an `Instant` taken just before the
            // limiter was built still counts from its true distance.
            epoch: Instant::now()
                .checked_sub(EPOCH_SLACK)
                .unwrap_or_else(Instant::now),
            hash: Default::default(),
            cells: quick_cache::sync::Cache::new(max_keys),
        }
    }

    pub fn gcra(&self) -> Gcra {
        self.gcra
    }

    /// Counts one request for `key` at `now` (any `Instant`; the limiter's
    /// clock starts when it is built, so a test can step time freely).
    pub fn decide(&self, key: &str, now: Instant) -> Verdict {
        let t =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        // Two 64-bit outputs of one keyed hash: of the key, and of the key
        // and one byte more (distinct messages for distinct keys, as a
        // `str` hashes with a terminator no text has). One pass over the
        // key, where two hashers of their own took two passes and two
        // set-ups (~200 instructions a request).
        let mut h = self.hash.build_hasher();
        key.hash(&mut h);
        let high = h.finish();
        h.write_u8(0x5a);
        let id = (u128::from(high) << 64) | u128::from(h.finish());
        let cell = match self.cells.get(&id) {
            Some(c) => c,
            None => match self.cells.get_or_insert_with(&id, || {
                Ok::<_, std::convert::Infallible>(Arc::new(AtomicU64::new(0)))
            }) {
                Ok(c) => c,
                Err(never) => match never {},
            },
        };
        let mut cur = cell.load(Ordering::Acquire);
        loop {
            let (verdict, new_tat) = self.gcra.decide(cur, t);
            let Some(new_tat) = new_tat else {
                return verdict;
            };
            match cell.compare_exchange_weak(cur, new_tat, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return verdict,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Keys held now (never more than `max_keys`).
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
}

// ---------------------------------------------------------------- redis

/// One atomic GCRA step on the server, on the server's clock (so instances
/// with skewed clocks agree). Times in microseconds; doubles hold them
/// exactly until the year 2255. Returns {admitted, TAT − now before}.
const GCRA_LUA: &str = r"
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local ahead = tat - now
if ahead > tolerance then
  return {0, ahead}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, ahead}
";

/// GCRA state in Redis, shared by every gateway instance that uses it.
pub struct RedisLimiter {
    gcra: Gcra,
    url: String,
    client: redis::Client,
    prefix: String,
    script: redis::Script,
    /// Made on first use: it needs a tokio runtime, and a Redis that is down
    /// at startup must not stop the gateway (`on_store_error` applies).
    conn: OnceLock<Result<redis::aio::ConnectionManager, String>>,
    timeout: Duration,
}

impl RedisLimiter {
    pub fn new(def: &RateLimitDef, url: &str) -> Result<RedisLimiter, RateLimitError> {
        let client = redis::Client::open(url).map_err(|source| RateLimitError::BadRedisUrl {
            url: url.to_string(),
            source,
        })?;
        Ok(RedisLimiter {
            gcra: Gcra::new(def.rate, def.burst),
            url: url.to_string(),
            client,
            prefix: format!("tollgate:rl:{}:", def.name),
            script: redis::Script::new(GCRA_LUA),
            conn: OnceLock::new(),
            timeout: REDIS_TIMEOUT,
        })
    }

    /// Changes the per-decision timeout (default [`REDIS_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> RedisLimiter {
        self.timeout = timeout;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn manager(&self) -> Result<redis::aio::ConnectionManager, String> {
        self.conn
            .get_or_init(|| {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(500));
                redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }

    /// The Redis key for a limiter key; long keys are hashed (the same way on
    /// every instance) so Redis memory per key stays small.
    fn redis_key(&self, key: &str) -> String {
        if key.len() <= 128 {
            format!("{}{key}", self.prefix)
        } else {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
            let mut out = format!("{}sha256:", self.prefix);
            for b in d.as_ref() {
                use std::fmt::Write as _;
                let _ = write!(out, "{b:02x}");
            }
            out
        }
    }

    /// Counts one request for `key`, atomically on the server. Any error or
    /// a reply slower than the timeout is [`Decision::StoreError`].
    pub async fn decide(&self, key: &str) -> Decision {
        let mut conn = match self.manager() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "rate-limit store unavailable");
                return Decision::StoreError;
            }
        };
        let interval_us = (self.gcra.interval / 1000).max(1);
        let mut call = self.script.key(self.redis_key(key));
        call.arg(interval_us).arg(self.gcra.tolerance / 1000);
        let reply =
            tokio::time::timeout(self.timeout, call.invoke_async::<(i64, i64)>(&mut conn)).await;
        match reply {
            Ok(Ok((admitted, ahead_us))) => {
                let ahead = u64::try_from(ahead_us).unwrap_or(0).saturating_mul(1000);
                Decision::Counted(self.gcra.verdict(ahead, admitted == 1))
            }
            Ok(Err(e)) => {
                tracing::warn!(url = %self.url, error = %e, "rate-limit store error");
                Decision::StoreError
            }
            Err(_) => {
                tracing::warn!(url = %self.url, "rate-limit store timed out");
                Decision::StoreError
            }
        }
    }
}

// ---------------------------------------------------------------- the limiter

enum Store {
    Memory(MemoryLimiter),
    Redis(Box<RedisLimiter>),
}

/// One `rate_limit` block, ready to count requests.
pub struct Limiter {
    def: RateLimitDef,
    store: Store,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("name", &self.def.name)
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// Builds the limiter of `def`. Prefer [`RateLimitStore::get`], which
    /// hands an unchanged block its old counters.
    pub fn new(def: &RateLimitDef) -> Result<Limiter, RateLimitError> {
        let store = match &def.store {
            RateStore::Memory => Store::Memory(MemoryLimiter::new(def)),
            RateStore::Redis(url) => Store::Redis(Box::new(RedisLimiter::new(def, url)?)),
        };
        Ok(Limiter {
            def: def.clone(),
            store,
        })
    }

    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// The key template; render it with `RequestVars::render`. An empty
    /// result is a key like any other (the shared key `""`, §7).
    pub fn key(&self) -> &Template {
        &self.def.key
    }

    /// `on_store_error allow` (the default) vs `deny`.
    pub fn on_store_error_allow(&self) -> bool {
        self.def.on_store_error_allow
    }

    pub fn def(&self) -> &RateLimitDef {
        &self.def
    }

    /// The memory store, if this is one (tests, metrics).
    pub fn memory(&self) -> Option<&MemoryLimiter> {
        match &self.store {
            Store::Memory(m) => Some(m),
            Store::Redis(_) => None,
        }
    }

    /// Counts one request for `key` at `now`. `now` drives the memory
    /// store; Redis uses its own clock. Ready at once for `store memory`.
    pub async fn decide(&self, key: &str, now: Instant) -> Decision {
        match &self.store {
            Store::Memory(m) => Decision::Counted(m.decide(key, now)),
            Store::Redis(r) => r.decide(key).await,
        }
    }
}

// ---------------------------------------------------------------- reload

/// A block's identity for carrying state over a reload: everything but
/// where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockId {
    name: String,
    key: Template,
    rate: Rate,
    burst: u64,
    store: RateStore,
    max_keys: u64,
    on_store_error_allow: bool,
}

impl From<&RateLimitDef> for BlockId {
    fn from(d: &RateLimitDef) -> BlockId {
        BlockId {
            name: d.name.clone(),
            key: d.key.clone(),
            rate: d.rate,
            burst: d.burst,
            store: d.store.clone(),
            max_keys: d.max_keys,
            on_store_error_allow: d.on_store_error_allow,
        }
    }
}

/// The limiters alive across reloads. `compile` asks it for each block; an
/// unchanged block gets the limiter (and counters) it had. It holds them
/// weakly: a block dropped from the config is freed with the last snapshot
/// that used it.
#[derive(Default)]
pub struct RateLimitStore {
    live: Mutex<HashMap<BlockId, Weak<Limiter>>>,
}

impl RateLimitStore {
    pub fn new() -> RateLimitStore {
        RateLimitStore::default()
    }

    /// The limiter for `def`: the live one of an identical block, else a new one.
    pub fn get(&self, def: &RateLimitDef) -> Result<Arc<Limiter>, RateLimitError> {
        let id = BlockId::from(def);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, w| w.strong_count() > 0);
        if let Some(l) = live.get(&id).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let l = Arc::new(Limiter::new(def)?);
        live.insert(id, Arc::downgrade(&l));
        Ok(l)
    }

    /// Blocks with a live limiter.
    pub fn len(&self) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.values().filter(|w| w.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_their_digits_remembered_or_not() {
        // Repeats (answered from the recent ones) and more distinct values
        // than are kept, interleaved.
        for round in 0..3u64 {
            for n in [0, 1, 60, 1, 99_999_999, 7, 8, 9, 10, 60, u64::MAX, round] {
                assert_eq!(number(n).as_bytes(), n.to_string().as_bytes());
            }
        }
    }
}

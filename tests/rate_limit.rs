//! `rate_limit` (LANGUAGE.md §7, §13.8–13.9): GCRA arithmetic on an
//! injected clock, the header values, the `max_keys` bound under a flood of
//! distinct keys, the shared empty key, carry-over across a reload, and the
//! Redis store against a real `redis-server` started by the test.

// A failed setup step should stop the test with its panic.
#![allow(clippy::unwrap_used)]

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use tollgate::config::model::{Piece, Rate, RateLimitDef, RateStore, Template, Var};
use tollgate::policy::rate_limit::{
    Decision, Limiter, MemoryLimiter, RateLimitStore, RedisLimiter, Verdict,
};

fn def(requests: u64, per: Duration, burst: u64) -> RateLimitDef {
    RateLimitDef {
        name: "per_ip".into(),
        span: Default::default(),
        key: Template {
            pieces: vec![Piece::Var(Var::RemoteAddr)],
        },
        rate: Rate { requests, per },
        burst,
        store: RateStore::Memory,
        max_keys: 1_000_000,
        on_store_error_allow: true,
    }
}

const MS: Duration = Duration::from_millis(1);

fn admitted(l: &MemoryLimiter, key: &str, at: Instant, n: usize) -> usize {
    (0..n).filter(|_| l.decide(key, at).allowed).count()
}

#[test]
fn ten_per_second_burst_five() {
    let l = MemoryLimiter::new(&def(10, Duration::from_secs(1), 5));
    let t0 = Instant::now();
    assert_eq!(admitted(&l, "k", t0, 30), 6, "burst + 1 at once");
    // Then one every 100 ms, and not sooner.
    assert_eq!(admitted(&l, "k", t0 + 99 * MS, 5), 0);
    for i in 1..=20u32 {
        let at = t0 + 100 * MS * i;
        assert_eq!(admitted(&l, "k", at, 5), 1, "at {i}00 ms");
    }
    // After a quiet second and a half the bucket is full again: 6 at once.
    let later = t0 + 2000 * MS + 1500 * MS;
    assert_eq!(admitted(&l, "k", later, 30), 6);
    // Other keys have their own buckets.
    assert_eq!(admitted(&l, "other", t0, 30), 6);
}

#[test]
fn header_values() {
    let l = MemoryLimiter::new(&def(10, Duration::from_secs(1), 5));
    let t0 = Instant::now();
    let first = l.decide("k", t0);
    assert_eq!(
        first,
        Verdict {
            allowed: true,
            limit: 6,
            remaining: 5,
            reset_after: 100 * MS,
            retry_after: None
        }
    );
    for _ in 0..4 {
        l.decide("k", t0);
    }
    let sixth = l.decide("k", t0);
    assert_eq!(
        (sixth.allowed, sixth.remaining, sixth.reset_after),
        (true, 0, 600 * MS)
    );
    let seventh = l.decide("k", t0);
    assert_eq!(
        seventh,
        Verdict {
            allowed: false,
            limit: 6,
            remaining: 0,
            reset_after: 600 * MS,
            retry_after: Some(100 * MS)
        }
    );
    let mut h = HeaderMap::new();
    seventh.write_headers(&mut h);
    assert_eq!(h["ratelimit-limit"], "6");
    assert_eq!(h["ratelimit-remaining"], "0");
    assert_eq!(h["ratelimit-reset"], "1");
    assert_eq!(h["retry-after"], "1", "whole seconds, rounded up");
    let mut h = HeaderMap::new();
    first.write_headers(&mut h);
    assert!(h.get("retry-after").is_none());

    // 100r/15m burst 20: T = 9 s.
    let l = MemoryLimiter::new(&def(100, Duration::from_secs(900), 20));
    assert_eq!(admitted(&l, "k", t0, 21), 21);
    let v = l.decide("k", t0 + 500 * MS);
    assert!(!v.allowed);
    assert_eq!(v.retry_after, Some(Duration::from_millis(8500)));
    let mut h = HeaderMap::new();
    v.write_headers(&mut h);
    assert_eq!(h["retry-after"], "9");
    assert_eq!(h["ratelimit-reset"], "189", "21 × 9 s − 0.5 s, rounded up");
}

#[test]
fn most_restrictive_of_several_limits() {
    let ok = |remaining| Verdict {
        allowed: true,
        limit: 10,
        remaining,
        reset_after: MS,
        retry_after: None,
    };
    let no = Verdict {
        allowed: false,
        remaining: 0,
        retry_after: Some(MS),
        ..ok(0)
    };
    assert_eq!(
        Verdict::most_restrictive([ok(5), ok(2), ok(7)]),
        Some(ok(2))
    );
    assert_eq!(Verdict::most_restrictive([ok(5), no, ok(0)]), Some(no));
    assert_eq!(Verdict::most_restrictive([]), None);
}

#[test]
fn the_empty_key_is_one_shared_bucket() {
    let l = MemoryLimiter::new(&def(1, Duration::from_secs(60), 1));
    let t0 = Instant::now();
    assert_eq!(admitted(&l, "", t0, 10), 2);
    assert_eq!(admitted(&l, "", t0 + Duration::from_secs(59), 10), 0);
}

#[test]
fn concurrent_requests_on_one_key_admit_exactly_the_burst() {
    let l = Arc::new(MemoryLimiter::new(&def(1, Duration::from_secs(3600), 99)));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let l = l.clone();
            std::thread::spawn(move || admitted(&l, "hot", t0, 1000))
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 100);
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn a_flood_of_distinct_keys_stays_within_max_keys() {
    let mut d = def(1, Duration::from_secs(3600), 0);
    d.max_keys = 10_000;
    let l = MemoryLimiter::new(&d);
    let t0 = Instant::now();
    let before = rss_kib();
    // The key being limited is seen throughout the flood and stays limited:
    // the flood of once-seen keys does not push it out.
    assert!(l.decide("victim", t0).allowed);
    let mut key = String::new();
    let mut max_len = 0;
    for i in 0..1_000_000u32 {
        key.clear();
        use std::fmt::Write as _;
        let _ = write!(
            key,
            "10.{}.{}.{}-{}",
            i >> 16,
            (i >> 8) & 255,
            i & 255,
            "x".repeat((i % 64) as usize)
        );
        l.decide(&key, t0);
        if i % 100 == 0 {
            assert!(
                !l.decide("victim", t0).allowed,
                "the victim's bucket survived key {i}"
            );
            max_len = max_len.max(l.len());
        }
    }
    let after = rss_kib();
    max_len = max_len.max(l.len());
    eprintln!(
        "1,000,000 distinct keys, max_keys 10,000: peak len {max_len}, RSS {before} KiB -> {after} KiB (+{} KiB)",
        after.saturating_sub(before)
    );
    assert!(max_len <= 10_000, "held {max_len} keys");
}

// ---------------------------------------------------------------- reload

#[tokio::test(flavor = "current_thread")]
async fn an_unchanged_block_keeps_its_counters_across_a_reload() {
    let store = RateLimitStore::new();
    let d = def(1, Duration::from_secs(3600), 0);
    let t0 = Instant::now();
    let old = store.get(&d).unwrap();
    assert!(matches!(old.decide("k", t0).await, Decision::Counted(v) if v.allowed));

    // The same block, written elsewhere in the file (another span).
    let mut moved = d.clone();
    moved.span.start = 999;
    let same = store.get(&moved).unwrap();
    assert!(Arc::ptr_eq(&old, &same));
    assert!(matches!(same.decide("k", t0).await, Decision::Counted(v) if !v.allowed));

    // A changed block starts afresh, and so does a same-content block of another name.
    let mut changed = d.clone();
    changed.burst = 1;
    let fresh = store.get(&changed).unwrap();
    assert!(!Arc::ptr_eq(&old, &fresh));
    assert!(matches!(fresh.decide("k", t0).await, Decision::Counted(v) if v.allowed));
    let mut renamed = d.clone();
    renamed.name = "other".into();
    assert!(!Arc::ptr_eq(&old, &store.get(&renamed).unwrap()));

    // The store holds limiters weakly: once no snapshot uses a block, it goes.
    assert_eq!(store.len(), 2);
    drop((old, same));
    assert_eq!(store.len(), 1);
    let again = store.get(&d).unwrap();
    assert!(matches!(again.decide("k", t0).await, Decision::Counted(v) if v.allowed));
    assert!(again.memory().is_some());
    assert_eq!(again.key(), &d.key);
}

// ---------------------------------------------------------------- redis

/// A `redis-server` on a free port, killed on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis { port, child: None };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install -y redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server listens");
            std::thread::yield_now();
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn redis_def(url: &str, name: &str, requests: u64, per: Duration, burst: u64) -> RateLimitDef {
    let mut d = def(requests, per, burst);
    d.name = name.into();
    d.store = RateStore::Redis(url.into());
    d
}

async fn count(l: &Limiter, key: &str, n: usize) -> (usize, usize) {
    let (mut ok, mut errors) = (0, 0);
    for _ in 0..n {
        match l.decide(key, Instant::now()).await {
            Decision::Counted(v) if v.allowed => ok += 1,
            Decision::Counted(_) => {}
            Decision::StoreError => errors += 1,
        }
    }
    (ok, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_instances_share_one_budget() {
    let redis = Redis::start();
    let d = redis_def(&redis.url(), "shared", 1, Duration::from_secs(3600), 9);
    // Two gateways: two limiters, two connections, one Redis.
    let (a, b) = (Limiter::new(&d).unwrap(), Limiter::new(&d).unwrap());
    let ((oka, ea), (okb, eb)) = tokio::join!(count(&a, "k", 15), count(&b, "k", 15));
    assert_eq!((ea, eb), (0, 0));
    assert_eq!(
        oka + okb,
        10,
        "together they admit what one alone would (burst 9 + 1)"
    );

    // The headers come from the same arithmetic as the memory store.
    let Decision::Counted(v) = a.decide("fresh", Instant::now()).await else {
        panic!("store error")
    };
    assert_eq!((v.allowed, v.limit, v.remaining), (true, 10, 9));
    let (ok, _) = count(&b, "fresh", 20).await;
    assert_eq!(ok, 9);
    let Decision::Counted(v) = b.decide("fresh", Instant::now()).await else {
        panic!("store error")
    };
    assert!(!v.allowed);
    let retry = v.retry_after.expect("a refusal says when to retry");
    assert!(
        retry > Duration::from_secs(3590) && retry <= Duration::from_secs(3600),
        "{retry:?}"
    );

    // Empty and very long keys are keys like any other.
    assert_eq!(count(&a, "", 20).await.0, 10);
    let long = "k".repeat(10_000);
    assert_eq!(count(&a, &long, 20).await.0, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_a_quick_store_error_and_a_restart_recovers() {
    let mut redis = Redis::start();
    let d = redis_def(&redis.url(), "flaky", 1000, Duration::from_secs(1), 100);
    let l = Limiter::new(&d).unwrap();
    assert!(matches!(
        l.decide("k", Instant::now()).await,
        Decision::Counted(_)
    ));

    redis.stop();
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(l.decide("k", Instant::now()).await, Decision::StoreError);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(400),
            "a store error comes within the timeout: {took:?}"
        );
    }

    redis.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Decision::Counted(v) = l.decide("k", Instant::now()).await {
            assert!(v.allowed);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the limiter reconnected after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn redis_that_never_answered_is_a_store_error_not_a_startup_failure() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = redis_def(
        &format!("redis://127.0.0.1:{port}/0"),
        "absent",
        10,
        Duration::from_secs(1),
        0,
    );
    let l = RedisLimiter::new(&d, &format!("redis://127.0.0.1:{port}/0")).unwrap();
    let started = Instant::now();
    assert_eq!(l.decide("k").await, Decision::StoreError);
    assert!(started.elapsed() < Duration::from_millis(400));
    assert!(Limiter::new(&redis_def("not a url", "bad", 1, Duration::from_secs(1), 0)).is_err());
}

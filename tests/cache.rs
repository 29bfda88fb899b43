//! The cache engine called directly, with tokio's paused clock: storage
//! rules, freshness precedence, Vary, coalescing, stale serving, purge, the
//! byte bound, large bodies and reload carry-over.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::advance;
use tollgate::config::model::{CacheDef, Template};
use tollgate::config::source::Span;
use tollgate::observe::metrics::{CacheLabels, METRICS};
use tollgate::policy::cache::{Cache, CacheRegistry, CacheStatus, Fetch, FetchError};
use tollgate::proxy::forward::{Body, BoxError};

fn def(name: &str) -> CacheDef {
    CacheDef {
        name: name.to_string(),
        span: Span::default(),
        max_size: 1 << 20,
        ttl: Duration::from_secs(60),
        key: Template::literal("$request_uri"),
        stale_while_revalidate: Duration::ZERO,
        stale_if_error: Duration::ZERO,
        methods: vec!["GET".into(), "HEAD".into()],
        max_entry_size: 64 * 1024,
    }
}

fn req(method: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = Request::builder().method(method).uri("/x");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn get() -> http::request::Parts {
    req("GET", &[])
}

fn body(b: impl Into<Bytes>) -> Body {
    Body::new(Full::new(b.into()).map_err(|never| match never {}))
}

fn resp(status: u16, headers: &[(&str, &str)], b: &str) -> Response<Body> {
    let mut r = Response::builder().status(status);
    for (n, v) in headers {
        r = r.header(*n, *v);
    }
    r.body(body(b.to_string())).expect("response")
}

/// A counting upstream: `make(n)` answers the n-th call (0-based), after
/// `delay` of (paused) time.
fn upstream(
    calls: &Arc<AtomicUsize>,
    delay: Duration,
    make: impl Fn(usize) -> Result<Response<Body>, FetchError> + Send + Sync + 'static,
) -> Fetch {
    let calls = Arc::clone(calls);
    let make = Arc::new(make);
    Arc::new(move || {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let make = Arc::clone(&make);
        Box::pin(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            make(n)
        })
    })
}

/// Always the same response.
fn fixed(
    calls: &Arc<AtomicUsize>,
    status: u16,
    headers: &'static [(&'static str, &'static str)],
) -> Fetch {
    upstream(calls, Duration::ZERO, move |n| {
        Ok(resp(status, headers, &format!("body {n}")))
    })
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// Serve and read the whole answer.
async fn run(
    cache: &Arc<Cache>,
    key: &str,
    parts: &http::request::Parts,
    fetch: &Fetch,
) -> (String, StatusCode, http::HeaderMap, Bytes) {
    let r = cache.serve(key.to_string(), parts, Arc::clone(fetch)).await;
    let status = r
        .headers()
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string();
    assert_eq!(
        r.extensions().get::<CacheStatus>().map(|s| s.as_str()),
        Some(status.as_str())
    );
    // Whatever the status: one `X-Cache-Status`, at most one `Age`, and
    // none of the stored map's placeholders left over.
    assert_eq!(r.headers().get_all("x-cache-status").iter().count(), 1);
    assert!(r.headers().get_all("age").iter().count() <= 1);
    assert!(!r.headers().contains_key("x-tollgate-spare-slot"));
    let (parts, b) = r.into_parts();
    let bytes = b.collect().await.expect("body").to_bytes();
    (status, parts.status, parts.headers, bytes)
}

async fn status_of(
    cache: &Arc<Cache>,
    key: &str,
    parts: &http::request::Parts,
    fetch: &Fetch,
) -> String {
    run(cache, key, parts, fetch).await.0
}

/// Let spawned tasks run (current-thread runtime: no real time passes).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn miss_hit_expiry_and_metrics() {
    let cache = Cache::new(&def("t_basic"));
    let calls = counter();
    let fetch = fixed(&calls, 200, &[("cache-control", "max-age=10")]);
    let (s, code, _, b) = run(&cache, "/a", &get(), &fetch).await;
    assert_eq!(
        (s.as_str(), code, &b[..]),
        ("MISS", StatusCode::OK, &b"body 0"[..])
    );
    let (s, _, h, b) = run(&cache, "/a", &get(), &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("HIT", &b"body 0"[..]));
    assert_eq!(h["content-length"], "6");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    advance(Duration::from_secs(11)).await;
    let (s, _, _, b) = run(&cache, "/a", &get(), &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("EXPIRED", &b"body 1"[..]));
    assert_eq!(status_of(&cache, "/a", &get(), &fetch).await, "HIT");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let count = |st: &str| {
        METRICS
            .cache_requests
            .get_or_create(&CacheLabels {
                cache: "t_basic".into(),
                status: st.into(),
            })
            .get()
    };
    assert_eq!((count("MISS"), count("HIT"), count("EXPIRED")), (1, 2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_fresh_hit_never_builds_the_fetch() {
    let cache = Cache::new(&def("t_lazy"));
    let calls = counter();
    let fetch = fixed(&calls, 200, &[("cache-control", "max-age=10")]);
    let built = counter();
    let b = Arc::clone(&built);
    let (status, r) = cache
        .serve_with("/a".into(), &get(), move || {
            b.fetch_add(1, Ordering::SeqCst);
            fetch
        })
        .await;
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(status, CacheStatus::Miss);
    assert_eq!(built.load(Ordering::SeqCst), 1, "a miss builds it");
    // Stored as the body is read.
    let body = r.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"body 0");
    settle().await;
    let (status, r) = cache
        .serve_with("/a".into(), &get(), || -> Fetch {
            panic!("a fresh hit built the upstream fetch")
        })
        .await;
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(status, CacheStatus::Hit);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn head_is_answered_from_a_stored_get_and_never_stored() {
    let cache = Cache::new(&def("t_head"));
    let calls = counter();
    let fetch = fixed(&calls, 200, &[("cache-control", "max-age=10")]);
    // A HEAD miss fetches through without storing.
    assert_eq!(
        status_of(&cache, "/h", &req("HEAD", &[]), &fetch).await,
        "MISS"
    );
    assert_eq!(status_of(&cache, "/h", &get(), &fetch).await, "MISS");
    let (s, _, h, b) = run(&cache, "/h", &req("HEAD", &[]), &fetch).await;
    assert_eq!((s.as_str(), b.len()), ("HIT", 0));
    assert_eq!(h["content-length"], "6");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A response (or request) that must not be stored: two requests, two
/// fetches, and the expected status both times.
async fn not_stored(
    name: &str,
    parts: http::request::Parts,
    fetch_status: u16,
    headers: &'static [(&'static str, &'static str)],
    expect: &str,
) {
    let cache = Cache::new(&def(name));
    let calls = counter();
    let fetch = fixed(&calls, fetch_status, headers);
    for i in 0..2 {
        let (s, code, _, b) = run(&cache, "/n", &parts, &fetch).await;
        assert_eq!(s, expect, "{name}");
        assert_eq!(code.as_u16(), fetch_status, "{name}");
        assert_eq!(b, format!("body {i}"), "{name}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "{name}");
    assert!(cache.is_empty(), "{name}");
}

#[tokio::test(start_paused = true)]
async fn responses_that_are_not_stored() {
    not_stored(
        "t_ns_nostore",
        get(),
        200,
        &[("cache-control", "no-store, max-age=60")],
        "MISS",
    )
    .await;
    not_stored(
        "t_ns_private",
        get(),
        200,
        &[("cache-control", "private, max-age=60")],
        "MISS",
    )
    .await;
    not_stored(
        "t_ns_nocache",
        get(),
        200,
        &[("cache-control", "no-cache")],
        "MISS",
    )
    .await;
    not_stored(
        "t_ns_cookie",
        get(),
        200,
        &[("set-cookie", "s=1"), ("cache-control", "max-age=60")],
        "MISS",
    )
    .await;
    not_stored("t_ns_varystar", get(), 200, &[("vary", "*")], "MISS").await;
    // Not cacheable at all, even with explicit freshness.
    not_stored(
        "t_ns_201",
        get(),
        201,
        &[("cache-control", "max-age=60")],
        "MISS",
    )
    .await;
    not_stored(
        "t_ns_302",
        get(),
        302,
        &[("cache-control", "max-age=60")],
        "MISS",
    )
    .await;
    not_stored(
        "t_ns_206",
        get(),
        206,
        &[("cache-control", "max-age=60")],
        "MISS",
    )
    .await;
    // Error statuses only with explicit freshness, never with `ttl`.
    not_stored("t_ns_404", get(), 404, &[], "MISS").await;
    // A quoted comma does not split a directive.
    not_stored(
        "t_ns_quoted",
        get(),
        200,
        &[("cache-control", "private=\"a, b\", max-age=60")],
        "MISS",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn requests_that_bypass() {
    not_stored(
        "t_bp_post",
        req("POST", &[]),
        200,
        &[("cache-control", "max-age=60")],
        "BYPASS",
    )
    .await;
    not_stored(
        "t_bp_nostore",
        req("GET", &[("cache-control", "no-store")]),
        200,
        &[("cache-control", "max-age=60")],
        "BYPASS",
    )
    .await;
    let auth = req("GET", &[("authorization", "Bearer x")]);
    not_stored(
        "t_bp_auth",
        auth.clone(),
        200,
        &[("cache-control", "max-age=60")],
        "BYPASS",
    )
    .await;

    // Explicitly public (or s-maxage): stored and served to Authorization.
    for cc in ["public, max-age=60", "s-maxage=60"] {
        let cache = Cache::new(&def("t_auth_public"));
        let calls = counter();
        let fetch = upstream(&calls, Duration::ZERO, move |_| {
            Ok(resp(200, &[("cache-control", cc)], "shared"))
        });
        assert_eq!(status_of(&cache, "/p", &auth, &fetch).await, "MISS");
        assert_eq!(status_of(&cache, "/p", &auth, &fetch).await, "HIT");
        assert_eq!(status_of(&cache, "/p", &get(), &fetch).await, "HIT");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    // A response stored for anonymous requests is not served to Authorization.
    let cache = Cache::new(&def("t_auth_stored"));
    let calls = counter();
    let fetch = fixed(&calls, 200, &[("cache-control", "max-age=60")]);
    assert_eq!(status_of(&cache, "/q", &get(), &fetch).await, "MISS");
    assert_eq!(status_of(&cache, "/q", &auth, &fetch).await, "BYPASS");
    assert_eq!(status_of(&cache, "/q", &get(), &fetch).await, "HIT");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn request_no_cache_refetches_and_replaces() {
    let cache = Cache::new(&def("t_req_nocache"));
    let calls = counter();
    let fetch = fixed(&calls, 200, &[("cache-control", "max-age=60")]);
    assert_eq!(status_of(&cache, "/r", &get(), &fetch).await, "MISS");
    for h in [
        ("cache-control", "no-cache"),
        ("cache-control", "max-age=0"),
        ("pragma", "no-cache"),
    ] {
        let (s, _, _, _) = run(&cache, "/r", &req("GET", &[h]), &fetch).await;
        assert_eq!(s, "EXPIRED", "{h:?}");
    }
    let (s, _, _, b) = run(&cache, "/r", &get(), &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("HIT", &b"body 3"[..]));
}

#[tokio::test(start_paused = true)]
async fn vary_keeps_two_variants() {
    let cache = Cache::new(&def("t_vary"));
    let calls = counter();
    let fetch = upstream(&calls, Duration::ZERO, |n| {
        Ok(resp(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
            &format!("v{n}"),
        ))
    });
    let en = req("GET", &[("accept-language", "en")]);
    let fr = req("GET", &[("accept-language", "fr")]);
    assert_eq!(run(&cache, "/v", &en, &fetch).await.0, "MISS");
    assert_eq!(run(&cache, "/v", &fr, &fetch).await.0, "MISS");
    let (s, _, _, b) = run(&cache, "/v", &en, &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("HIT", &b"v0"[..]));
    let (s, _, _, b) = run(&cache, "/v", &fr, &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("HIT", &b"v1"[..]));
    // No header at all is a third variant.
    assert_eq!(run(&cache, "/v", &get(), &fetch).await.0, "MISS");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Purging the key removes every variant.
    assert_eq!(cache.purge(Some("/v")), 3);
    assert_eq!(run(&cache, "/v", &en, &fetch).await.0, "MISS");
}

/// Fresh just before `secs`, expired just after.
async fn lifetime_is(name: &str, headers: Vec<(String, String)>, secs: u64) {
    let mut d = def(name);
    d.ttl = Duration::from_secs(60);
    let cache = Cache::new(&d);
    let calls = counter();
    let fetch = upstream(&calls, Duration::ZERO, move |_| {
        let mut r = Response::builder().status(200);
        for (n, v) in &headers {
            r = r.header(n.as_str(), v.as_str());
        }
        Ok(r.body(body("x")).expect("response"))
    });
    assert_eq!(
        status_of(&cache, "/f", &get(), &fetch).await,
        "MISS",
        "{name}"
    );
    advance(Duration::from_secs(secs) - Duration::from_millis(500)).await;
    assert_eq!(
        status_of(&cache, "/f", &get(), &fetch).await,
        "HIT",
        "{name}"
    );
    advance(Duration::from_secs(1)).await;
    assert_eq!(
        status_of(&cache, "/f", &get(), &fetch).await,
        "EXPIRED",
        "{name}"
    );
}

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn freshness_precedence() {
    let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let fmt = |t: SystemTime| httpdate::fmt_http_date(t);
    let date_s = fmt(date);
    let exp30 = fmt(date + Duration::from_secs(30));
    lifetime_is(
        "t_fp_smax",
        h(&[
            ("cache-control", "max-age=100, s-maxage=10"),
            ("date", &date_s),
            ("expires", &exp30),
        ]),
        10,
    )
    .await;
    lifetime_is(
        "t_fp_max",
        h(&[
            ("cache-control", "max-age=20"),
            ("date", &date_s),
            ("expires", &exp30),
        ]),
        20,
    )
    .await;
    lifetime_is(
        "t_fp_expires",
        h(&[("date", &date_s), ("expires", &exp30)]),
        30,
    )
    .await;
    lifetime_is("t_fp_ttl", h(&[]), 60).await;
    // Upstream Age counts against the lifetime.
    lifetime_is(
        "t_fp_age",
        h(&[("cache-control", "max-age=20"), ("age", "5")]),
        15,
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn invalid_expires_is_stale_and_ttl_zero_is_not_stored() {
    let mut d = def("t_fp_bad");
    d.stale_if_error = Duration::ZERO;
    let cache = Cache::new(&d);
    let calls = counter();
    let fetch = fixed(&calls, 200, &[("expires", "0")]);
    assert_eq!(status_of(&cache, "/e", &get(), &fetch).await, "MISS");
    assert_eq!(status_of(&cache, "/e", &get(), &fetch).await, "MISS");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_hit_answers_the_stored_headers_in_order_and_takes_more() {
    let cache = Cache::new(&def("t_hit_headers"));
    let calls = counter();
    let fetch = fixed(
        &calls,
        200,
        &[
            ("cache-control", "max-age=100"),
            ("x-a", "1"),
            ("content-type", "text/plain"),
            ("x-a", "2"),
        ],
    );
    let (_, _, miss, _) = run(&cache, "/h", &get(), &fetch).await;
    settle().await;
    for _ in 0..2 {
        let (s, _, mut h, b) = run(&cache, "/h", &get(), &fetch).await;
        assert_eq!((s.as_str(), &b[..]), ("HIT", &b"body 0"[..]));
        let a: Vec<&[u8]> = h.get_all("x-a").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(a, [b"1", b"2"]);
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(h["cache-control"], miss["cache-control"]);
        assert_eq!(h["age"], "0");
        // What the gateway adds on the way out (the request id, headers
        // of the location) goes in as into any map.
        h.insert("x-request-id", http::HeaderValue::from_static("id-1"));
        h.append("x-b", http::HeaderValue::from_static("b"));
        assert_eq!(h["x-request-id"], "id-1");
        assert_eq!(h["x-b"], "b");
        assert_eq!(h.get_all("x-a").iter().count(), 2);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn age_on_hits() {
    let cache = Cache::new(&def("t_age"));
    let calls = counter();
    let fetch = fixed(
        &calls,
        200,
        &[("cache-control", "max-age=100"), ("age", "5")],
    );
    run(&cache, "/age", &get(), &fetch).await;
    advance(Duration::from_secs(10)).await;
    let (s, _, h, _) = run(&cache, "/age", &get(), &fetch).await;
    assert_eq!(s, "HIT");
    assert_eq!(h["age"], "15");
}

#[tokio::test(start_paused = true)]
async fn twenty_concurrent_misses_fetch_once() {
    let cache = Cache::new(&def("t_coalesce"));
    let calls = counter();
    let fetch = upstream(&calls, Duration::from_millis(50), |_| {
        Ok(resp(200, &[("cache-control", "max-age=60")], "one"))
    });
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (cache, fetch) = (Arc::clone(&cache), Arc::clone(&fetch));
            tokio::spawn(async move { run(&cache, "/c", &get(), &fetch).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let (s, code, _, b) = t.await.expect("task");
        assert_eq!((code, &b[..]), (StatusCode::OK, &b"one"[..]));
        statuses.push(s);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(statuses.iter().filter(|s| *s == "MISS").count(), 1);
    assert_eq!(statuses.iter().filter(|s| *s == "HIT").count(), 19);
}

/// The leader's fetch fails or is not storable: the waiters fetch for
/// themselves and succeed.
#[tokio::test(start_paused = true)]
async fn leader_failure_releases_waiters_to_their_own_fetch() {
    for (name, first) in [("t_lead_err", 0), ("t_lead_private", 1)] {
        let cache = Cache::new(&def(name));
        let calls = counter();
        let fetch =
            upstream(&calls, Duration::from_millis(50), move |n| {
                match (n, first) {
                    (0, 0) => Err(FetchError::new(StatusCode::BAD_GATEWAY, "Bad gateway")
                        .with_request_id("rid")),
                    (0, _) => Ok(resp(200, &[("cache-control", "private")], "mine")),
                    _ => Ok(resp(200, &[], "ok")),
                }
            });
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let (cache, fetch) = (Arc::clone(&cache), Arc::clone(&fetch));
                tokio::spawn(async move { run(&cache, "/l", &get(), &fetch).await })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            let (s, code, _, b) = t.await.expect("task");
            assert_eq!(s, "MISS", "{name}");
            if code == StatusCode::OK && (&b[..] == b"ok" || &b[..] == b"mine") {
                ok += 1;
            } else {
                assert_eq!(code, StatusCode::BAD_GATEWAY);
                let v: serde_json::Value = serde_json::from_slice(&b).expect("json error");
                assert_eq!(
                    v,
                    serde_json::json!({"error": "Bad gateway", "status": 502, "request_id": "rid"})
                );
            }
        }
        assert_eq!(ok, if first == 0 { 4 } else { 5 }, "{name}");
        assert_eq!(calls.load(Ordering::SeqCst), 5, "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn stale_if_error() {
    let mut d = def("t_sie");
    d.stale_if_error = Duration::from_secs(300);
    let cache = Cache::new(&d);
    let calls = counter();
    let fetch = upstream(&calls, Duration::ZERO, |n| match n {
        0 => Ok(resp(200, &[("cache-control", "max-age=10")], "good")),
        1 => Err(FetchError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Gateway timeout",
        )),
        _ => Ok(resp(503, &[], "down")),
    });
    assert_eq!(status_of(&cache, "/s", &get(), &fetch).await, "MISS");
    advance(Duration::from_secs(20)).await;
    let (s, code, h, b) = run(&cache, "/s", &get(), &fetch).await;
    assert_eq!(
        (s.as_str(), code, &b[..]),
        ("STALE", StatusCode::OK, &b"good"[..])
    );
    assert_eq!(h["age"], "20");
    let (s, _, _, b) = run(&cache, "/s", &get(), &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("STALE", &b"good"[..]));
    // Past the window: the failure is the answer.
    advance(Duration::from_secs(300)).await;
    let (s, code, _, b) = run(&cache, "/s", &get(), &fetch).await;
    assert_eq!(
        (s.as_str(), code, &b[..]),
        ("EXPIRED", StatusCode::SERVICE_UNAVAILABLE, &b"down"[..])
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn must_revalidate_disables_stale() {
    let mut d = def("t_mustreval");
    d.stale_if_error = Duration::from_secs(300);
    let cache = Cache::new(&d);
    let calls = counter();
    let fetch = upstream(&calls, Duration::ZERO, |n| match n {
        0 => Ok(resp(
            200,
            &[("cache-control", "max-age=10, must-revalidate")],
            "good",
        )),
        _ => Err(FetchError::new(StatusCode::BAD_GATEWAY, "Bad gateway")),
    });
    run(&cache, "/m", &get(), &fetch).await;
    advance(Duration::from_secs(20)).await;
    let (s, code, _, _) = run(&cache, "/m", &get(), &fetch).await;
    assert_eq!((s.as_str(), code), ("EXPIRED", StatusCode::BAD_GATEWAY));
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_refreshes_once_in_the_background() {
    let mut d = def("t_swr");
    d.stale_while_revalidate = Duration::from_secs(30);
    let cache = Cache::new(&d);
    let calls = counter();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fetch: Fetch = {
        let (calls, gate) = (Arc::clone(&calls), Arc::clone(&gate));
        Arc::new(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            let gate = Arc::clone(&gate);
            Box::pin(async move {
                if n > 0 {
                    let _permit = gate.acquire().await.expect("gate");
                }
                Ok(resp(
                    200,
                    &[("cache-control", "max-age=10")],
                    &format!("gen {n}"),
                ))
            })
        })
    };
    assert_eq!(status_of(&cache, "/w", &get(), &fetch).await, "MISS");
    advance(Duration::from_secs(15)).await;
    for _ in 0..3 {
        let (s, _, h, b) = run(&cache, "/w", &get(), &fetch).await;
        assert_eq!((s.as_str(), &b[..]), ("UPDATING", &b"gen 0"[..]));
        assert_eq!(h["age"], "15");
        settle().await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one background refresh");
    gate.add_permits(10);
    settle().await;
    let (s, _, _, b) = run(&cache, "/w", &get(), &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("HIT", &b"gen 1"[..]));
    // Past the window the request waits for the fetch.
    advance(Duration::from_secs(45)).await;
    let (s, _, _, b) = run(&cache, "/w", &get(), &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("EXPIRED", &b"gen 2"[..]));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn purge_one_and_all() {
    let cache = Cache::new(&def("t_purge"));
    let calls = counter();
    let fetch = fixed(&calls, 200, &[("cache-control", "max-age=60")]);
    for k in ["/a", "/ab", "/b", "/c"] {
        run(&cache, k, &get(), &fetch).await;
    }
    assert_eq!(cache.purge(Some("/a")), 1);
    assert_eq!(cache.purge(Some("/nothing")), 0);
    assert_eq!(status_of(&cache, "/a", &get(), &fetch).await, "MISS");
    assert_eq!(status_of(&cache, "/ab", &get(), &fetch).await, "HIT");
    assert_eq!(cache.purge(None), 4);
    assert!(cache.is_empty());
    assert_eq!(status_of(&cache, "/b", &get(), &fetch).await, "MISS");
}

#[tokio::test(start_paused = true)]
async fn weight_stays_within_max_size() {
    let mut d = def("t_bound");
    d.max_size = 64 * 1024;
    d.max_entry_size = 8 * 1024;
    let cache = Cache::new(&d);
    let calls = counter();
    let big = "x".repeat(4096);
    let fetch = upstream(&calls, Duration::ZERO, move |_| {
        Ok(resp(200, &[("cache-control", "max-age=60")], &big))
    });
    for i in 0..100 {
        let (s, _, _, b) = run(&cache, &format!("/k{i}"), &get(), &fetch).await;
        assert_eq!((s.as_str(), b.len()), ("MISS", 4096));
        assert!(
            cache.weight() <= d.max_size,
            "weight {} after {i}",
            cache.weight()
        );
    }
    assert!(
        cache.len() < 100 && cache.len() >= 8,
        "{} entries",
        cache.len()
    );
}

/// A body whose chunks arrive when the test sends them; it ends when the
/// sender is dropped.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    (tx, Body::new(ChannelBody(rx)))
}

#[tokio::test(start_paused = true)]
async fn large_bodies_stream_through_uncached() {
    let mut d = def("t_large");
    d.max_entry_size = 1024;
    let cache = Cache::new(&d);

    // Announced too large: not stored.
    let calls = counter();
    let fetch = upstream(&calls, Duration::ZERO, |_| {
        Ok(resp(
            200,
            &[("cache-control", "max-age=60"), ("content-length", "4096")],
            &"y".repeat(4096),
        ))
    });
    for _ in 0..2 {
        let (s, _, _, b) = run(&cache, "/big", &get(), &fetch).await;
        assert_eq!((s.as_str(), b.len()), ("MISS", 4096));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Streamed without a length: the client gets the first chunk before the
    // upstream sent the rest; the copy is dropped past the limit.
    let senders = Arc::new(std::sync::Mutex::new(Vec::new()));
    let calls = counter();
    let fetch: Fetch = {
        let (calls, senders) = (Arc::clone(&calls), Arc::clone(&senders));
        Arc::new(move || {
            calls.fetch_add(1, Ordering::SeqCst);
            let (tx, b) = channel_body();
            senders.lock().expect("lock").push(tx);
            Box::pin(async move {
                let mut r = Response::new(b);
                r.headers_mut()
                    .insert("cache-control", "max-age=60".parse().expect("value"));
                Ok(r)
            })
        })
    };
    let r = cache
        .serve("/stream".into(), &get(), Arc::clone(&fetch))
        .await;
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    let tx = senders.lock().expect("lock").pop().expect("sender");
    let mut b = r.into_body();
    tx.send(Bytes::from(vec![b'a'; 800])).await.expect("send");
    let first = b
        .frame()
        .await
        .expect("frame")
        .expect("ok")
        .into_data()
        .expect("data");
    assert_eq!(first.len(), 800);
    tx.send(Bytes::from(vec![b'b'; 800])).await.expect("send");
    let second = b
        .frame()
        .await
        .expect("frame")
        .expect("ok")
        .into_data()
        .expect("data");
    assert_eq!(second.len(), 800);
    drop(tx);
    assert!(b.frame().await.is_none());
    assert!(cache.is_empty(), "over the entry limit: not stored");

    // Under the limit, streamed: stored once the body ends.
    let r = cache
        .serve("/small".into(), &get(), Arc::clone(&fetch))
        .await;
    let tx = senders.lock().expect("lock").pop().expect("sender");
    tx.send(Bytes::from_static(b"tiny")).await.expect("send");
    drop(tx);
    let got = r.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&got[..], b"tiny");
    let (s, _, h, b) = run(&cache, "/small", &get(), &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("HIT", &b"tiny"[..]));
    assert_eq!(h["content-length"], "4");
}

#[tokio::test(start_paused = true)]
async fn abandoned_leader_body_releases_waiters() {
    let cache = Cache::new(&def("t_abandon"));
    let calls = counter();
    let fetch = upstream(&calls, Duration::from_millis(10), |_| {
        Ok(resp(200, &[("cache-control", "max-age=60")], "z"))
    });
    // The leader's client goes away before reading the body.
    let leader = {
        let (cache, fetch) = (Arc::clone(&cache), Arc::clone(&fetch));
        tokio::spawn(async move { cache.serve("/z".into(), &get(), fetch).await })
    };
    settle().await;
    let waiter = {
        let (cache, fetch) = (Arc::clone(&cache), Arc::clone(&fetch));
        tokio::spawn(async move { run(&cache, "/z", &get(), &fetch).await })
    };
    settle().await;
    drop(leader.await.expect("leader"));
    let (s, _, _, b) = waiter.await.expect("waiter");
    assert_eq!((s.as_str(), &b[..]), ("MISS", &b"z"[..]));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn registry_carries_unchanged_blocks_over_reloads() {
    let registry = CacheRegistry::new();
    let d = def("t_registry");
    let first = registry.get_or_create(&d);
    let calls = counter();
    let fetch = fixed(&calls, 200, &[("cache-control", "max-age=60")]);
    run(&first, "/r", &get(), &fetch).await;

    // Same block at another place in the file: same cache, same contents.
    let moved = CacheDef {
        span: Span::new(Default::default(), 100, 200),
        ..d.clone()
    };
    let again = registry.get_or_create(&moved);
    assert!(Arc::ptr_eq(&first, &again));
    assert_eq!(status_of(&again, "/r", &get(), &fetch).await, "HIT");

    // A changed block starts empty; the old one goes on retain.
    let changed = CacheDef {
        ttl: Duration::from_secs(5),
        ..d.clone()
    };
    let fresh = registry.get_or_create(&changed);
    assert!(!Arc::ptr_eq(&first, &fresh));
    assert_eq!(status_of(&fresh, "/r", &get(), &fetch).await, "MISS");
    assert_eq!(registry.len(), 2);
    registry.retain(std::slice::from_ref(&changed));
    assert_eq!(registry.len(), 1);
    assert!(Arc::ptr_eq(&registry.get_or_create(&changed), &fresh));
}

/// A 304 (answer to the client's own conditional) leaves the stored
/// response alone; a refetched response that may not be stored removes it.
#[tokio::test(start_paused = true)]
async fn refetch_outcome_decides_the_fate_of_the_old_entry() {
    let mut d = def("t_forget");
    d.stale_if_error = Duration::from_secs(300);
    let cache = Cache::new(&d);
    let calls = counter();
    let fetch = upstream(&calls, Duration::ZERO, |n| match n {
        0 => Ok(resp(200, &[("cache-control", "max-age=10")], "good")),
        1 => Ok(resp(304, &[], "")),
        3 => Ok(resp(200, &[("cache-control", "no-store")], "secret")),
        _ => Err(FetchError::new(StatusCode::BAD_GATEWAY, "Bad gateway")),
    });
    run(&cache, "/o", &get(), &fetch).await;
    advance(Duration::from_secs(20)).await;
    let (s, code, _, _) = run(&cache, "/o", &get(), &fetch).await;
    assert_eq!((s.as_str(), code), ("EXPIRED", StatusCode::NOT_MODIFIED));
    let (s, _, _, b) = run(&cache, "/o", &get(), &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("STALE", &b"good"[..]));
    let (s, _, _, b) = run(&cache, "/o", &get(), &fetch).await;
    assert_eq!((s.as_str(), &b[..]), ("EXPIRED", &b"secret"[..]));
    let (s, code, _, _) = run(&cache, "/o", &get(), &fetch).await;
    assert_eq!((s.as_str(), code), ("MISS", StatusCode::BAD_GATEWAY));
}

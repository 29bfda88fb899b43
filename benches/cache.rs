//! The cache hit path: `Cache::serve` answering a 1 KiB stored response
//! (lookup, freshness check, response rebuilt from the entry, status
//! header, metrics). The fetch counts its calls; there must be none.
//!
//! `cargo bench --bench cache -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tollgate::config::model::{CacheDef, Template};
use tollgate::config::source::Span;
use tollgate::policy::cache::{Cache, Fetch, FetchError};
use tollgate::proxy::forward::Body;

fn def() -> CacheDef {
    CacheDef {
        name: "bench".into(),
        span: Span::default(),
        max_size: 256 << 20,
        ttl: Duration::from_secs(600),
        key: Template::literal("$request_uri"),
        stale_while_revalidate: Duration::from_secs(30),
        stale_if_error: Duration::from_secs(300),
        methods: vec!["GET".into(), "HEAD".into()],
        max_entry_size: 8 << 20,
    }
}

fn hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let cache = Cache::new(&def());
    let parts = Request::builder()
        .uri("/api/products/42")
        .header("accept", "application/json")
        .body(())
        .expect("request")
        .into_parts()
        .0;
    let key = "http://shop.example/api/products/42".to_string();
    let fill: Fetch = Arc::new(|| {
        Box::pin(async {
            let body =
                Body::new(Full::new(Bytes::from(vec![b'x'; 1024])).map_err(|never| match never {}));
            Ok(Response::builder()
                .header("content-type", "application/json")
                .header("cache-control", "max-age=600")
                .body(body)
                .expect("response"))
        })
    });
    rt.block_on(async {
        let r = cache.serve(key.clone(), &parts, fill).await;
        r.into_body().collect().await.expect("body");
    });
    let fetched = Arc::new(AtomicUsize::new(0));
    let never: Fetch = {
        let fetched = Arc::clone(&fetched);
        Arc::new(move || {
            fetched.fetch_add(1, Ordering::Relaxed);
            Box::pin(async {
                Err(FetchError::new(
                    StatusCode::BAD_GATEWAY,
                    "a hit must not fetch",
                ))
            })
        })
    };

    c.bench_function("cache_hit_1k", |b| {
        b.iter(|| {
            let r = rt.block_on(cache.serve(black_box(key.clone()), &parts, Arc::clone(&never)));
            debug_assert_eq!(r.headers()["x-cache-status"], "HIT");
            black_box(r)
        })
    });
    c.bench_function("cache_hit_1k_read_body", |b| {
        b.iter(|| {
            rt.block_on(async {
                let r = cache
                    .serve(black_box(key.clone()), &parts, Arc::clone(&never))
                    .await;
                black_box(r.into_body().collect().await.expect("body").to_bytes())
            })
        })
    });
    assert_eq!(fetched.load(Ordering::Relaxed), 0, "a hit fetched");
}

criterion_group!(benches, hit);
criterion_main!(benches);

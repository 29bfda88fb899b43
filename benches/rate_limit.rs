//! Memory rate-limit decision cost: one hot key, and keys spread over a set
//! larger than `max_keys` (every decision a miss, insert and eviction).
//!
//! `cargo bench --bench rate_limit -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tollgate::config::model::{Piece, Rate, RateLimitDef, RateStore, Template, Var};
use tollgate::policy::rate_limit::MemoryLimiter;

fn def(max_keys: u64) -> RateLimitDef {
    RateLimitDef {
        name: "bench".into(),
        span: Default::default(),
        key: Template {
            pieces: vec![Piece::Var(Var::RemoteAddr)],
        },
        rate: Rate {
            requests: 100,
            per: Duration::from_secs(1),
        },
        burst: 20,
        store: RateStore::Memory,
        max_keys,
        on_store_error_allow: true,
    }
}

fn decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("rate_limit_memory");
    g.throughput(Throughput::Elements(1));

    let l = MemoryLimiter::new(&def(100_000));
    let t0 = Instant::now();
    g.bench_function("hot_key", |b| {
        b.iter(|| l.decide(black_box("203.0.113.7"), t0))
    });

    // 50,000 keys cycled through a 100,000-key store: all hits after warm-up.
    let keys: Vec<String> = (0..50_000u32)
        .map(|i| format!("10.0.{}.{}", i >> 8, i & 255))
        .collect();
    let l = MemoryLimiter::new(&def(100_000));
    let mut i = 0;
    g.bench_function("50k_keys_resident", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            l.decide(black_box(&keys[i]), t0)
        })
    });

    // 1,000,000 keys through a 10,000-key store: misses, inserts, evictions.
    let keys: Vec<String> = (0..1_000_000u32)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let l = MemoryLimiter::new(&def(10_000));
    let mut i = 0;
    g.bench_function("1m_keys_through_10k", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            l.decide(black_box(&keys[i]), t0)
        })
    });
    assert!(l.len() <= 10_000);
    g.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);

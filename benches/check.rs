//! `tollgate check`'s cost on large configs: text → `load_bytes` →
//! `validate`, for 100, 1,000 and 10,000 locations (mostly prefix, some
//! exact, some regex with a capture). Results: bench/RESULTS.md.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tollgate::config::diagnostics::Diagnostics;
use tollgate::config::parse::load_bytes;
use tollgate::config::validate::validate;

/// A server with `n` locations: 8 in 10 prefix, 1 in 10 exact, 1 in 10
/// regex.
fn config(n: usize) -> String {
    let mut s = String::with_capacity(n * 64);
    s.push_str("upstream backend {\n    server 127.0.0.1:9001;\n    server 127.0.0.1:9002;\n}\n\n");
    s.push_str("server {\n    listen 8080;\n    server_name api.example;\n\n");
    for i in 0..n {
        let _ = match i % 10 {
            8 => writeln!(
                s,
                "    location = /exact/{i} {{\n        return 200 \"ok\";\n    }}"
            ),
            9 => writeln!(
                s,
                "    location ~ ^/r/{i}/(\\d+)$ {{\n        proxy_pass http://backend/items/$1;\n    }}"
            ),
            _ => writeln!(
                s,
                "    location /svc/{i}/ {{\n        proxy_pass http://backend;\n    }}"
            ),
        };
    }
    s.push_str("}\n");
    s
}

fn check(text: &[u8]) -> bool {
    let mut diags = Diagnostics::new();
    let loaded = load_bytes(Path::new("bench.conf"), text, &mut diags);
    let env = |_: &str| None;
    let config = validate(&loaded, &env, &mut diags);
    config.is_some() && !diags.has_errors()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("check");
    g.sample_size(10);
    for n in [100usize, 1_000, 10_000] {
        let text = config(n);
        if !check(text.as_bytes()) {
            let mut diags = Diagnostics::new();
            let loaded = load_bytes(Path::new("bench.conf"), text.as_bytes(), &mut diags);
            validate(&loaded, &|_: &str| None, &mut diags);
            let first: Vec<_> = diags.iter().take(5).collect();
            panic!("the generated config must be valid: {first:#?}");
        }
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("parse_validate", n), &text, |b, t| {
            b.iter(|| check(black_box(t.as_bytes())))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

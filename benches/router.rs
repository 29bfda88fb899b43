//! Router micro-benchmarks: one `lookup` with 10, 1,000 and 10,000 prefix
//! locations (a hit on the last location added, and a miss), a mix with
//! regexes, server selection, and path normalization. The claim under test
//! (LANGUAGE.md §3): the cost of one match stays flat as locations grow.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tollgate::compile::normalize::normalize_path;
use tollgate::compile::router::{Lookup, Router, RouterBuilder, ServerNameSpec};
use tollgate::config::model::Modifier;

fn listen() -> Vec<(SocketAddr, bool)> {
    vec![(SocketAddr::from(([0, 0, 0, 0], 80)), false)]
}

/// `n` prefix locations shaped like a real API gateway's: `/svc{i}/api/`.
fn prefixes(n: usize, regexes: usize) -> Router {
    let mut b = RouterBuilder::new();
    let s = b.server(&listen(), &[]);
    let added = b.location(s, Modifier::Prefix, "/api/v1/users/", true);
    black_box(added.is_ok());
    for i in 0..n.saturating_sub(1) {
        let added = b.location(s, Modifier::Prefix, &format!("/svc{i}/api/"), true);
        black_box(added.is_ok());
    }
    for i in 0..regexes {
        let added = b.location(
            s,
            Modifier::Regex,
            &format!(r"^/re{i}/(?<id>[0-9]+)\.json$"),
            false,
        );
        black_box(added.is_ok());
    }
    match b.build() {
        Ok(r) => r,
        Err(e) => panic!("bench router does not build: {e}"),
    }
}

fn location_of(l: Lookup<'_>) -> usize {
    match l {
        Lookup::Found { location, .. } | Lookup::RedirectSlash { location } => location,
        Lookup::NotFound => usize::MAX,
    }
}

fn bench_prefixes(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_prefix");
    for n in [10usize, 1_000, 10_000] {
        let r = prefixes(n, 0);
        let last = format!("/svc{}/api/users/42", n - 2);
        g.bench_with_input(BenchmarkId::new("hit_last", n), &last, |b, p| {
            b.iter(|| location_of(r.lookup(0, black_box(p))))
        });
        // The same path and location at every size: isolates the location
        // count from the shape of the key that is looked up.
        let fixed = "/api/v1/users/42".to_owned();
        g.bench_with_input(BenchmarkId::new("hit_fixed", n), &fixed, |b, p| {
            b.iter(|| location_of(r.lookup(0, black_box(p))))
        });
        let miss = "/nothing/here/users/42".to_owned();
        g.bench_with_input(BenchmarkId::new("miss", n), &miss, |b, p| {
            b.iter(|| location_of(r.lookup(0, black_box(p))))
        });
    }
    g.finish();
}

fn bench_mix(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_mix_1000_prefix_50_regex");
    let r = prefixes(1_000, 50);
    let cases = [
        (
            "prefix_hit_no_regex_match",
            "/svc999/api/users/42".to_owned(),
        ),
        ("regex_hit_last", "/re49/12345.json".to_owned()),
        ("regex_hit_first", "/re0/12345.json".to_owned()),
        ("miss", "/nothing/here".to_owned()),
    ];
    for (name, path) in cases {
        g.bench_with_input(BenchmarkId::from_parameter(name), &path, |b, p| {
            b.iter(|| location_of(r.lookup(0, black_box(p))))
        });
    }
    g.finish();
}

fn bench_select_server(c: &mut Criterion) {
    let mut b = RouterBuilder::new();
    for i in 0..1_000 {
        b.server(
            &listen(),
            &[
                ServerNameSpec::Exact(format!("host{i}.example.com")),
                ServerNameSpec::LeadingWildcard(format!(".w{i}.example.net")),
            ],
        );
    }
    let r = match b.build() {
        Ok(r) => r,
        Err(e) => panic!("bench router does not build: {e}"),
    };
    let local = SocketAddr::from(([10, 0, 0, 1], 80));
    let mut g = c.benchmark_group("select_server_1000");
    for (name, host) in [
        ("exact", "host999.example.com"),
        ("leading_wildcard", "a.b.w999.example.net"),
        ("default", "unknown.example.org"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| r.select_server(local, black_box(Some(host))))
        });
    }
    g.finish();
}

fn bench_normalize(c: &mut Criterion) {
    let mut g = c.benchmark_group("normalize");
    for (name, path) in [
        ("already_normal", "/svc12/api/users/42/orders"),
        ("needs_work", "/svc12//api/./users/%34%32/x/../orders"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| normalize_path(black_box(path)).map(|p| p.len()))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_prefixes,
    bench_mix,
    bench_select_server,
    bench_normalize
);
criterion_main!(benches);

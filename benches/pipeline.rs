//! The per-request pipeline pieces between routing and the upstream:
//! variable expansion (templates of `proxy_set_header`, `add_header`,
//! cache and rate-limit keys) and the upstream request head written from
//! the client's headers (hop-by-hop and `Connection`-listed ones dropped,
//! the gateway's own replacing the client's), and the header lookups the
//! path makes (a scan for small maps, `HeaderMap`'s hash for larger ones).
//!
//! `cargo bench --bench pipeline -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use tollgate::config::model::Template;
use tollgate::config::value::{TemplateEnv, parse_template};
use tollgate::proxy::client::{Passthrough, encode_head};
use tollgate::proxy::vars::RequestVars;

fn template(text: &str) -> Template {
    let env = TemplateEnv {
        env: &|_| None,
        named_captures: &[],
        calls: &[],
    };
    parse_template(text, &[], &env).expect("template")
}

/// A browser-like request: eight headers, a cookie, a bearer token.
fn client_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("host", "api.example.com"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) bench"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        (
            "authorization",
            "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI3In0.sig",
        ),
        ("cookie", "session=abc123; theme=dark"),
        ("x-user", "7"),
        ("connection", "keep-alive"),
    ] {
        h.append(
            HeaderName::from_static(n),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

fn bench(c: &mut Criterion) {
    let headers = client_headers();
    let vars = RequestVars {
        remote_addr: "203.0.113.7".parse().expect("ip"),
        host: "api.example.com",
        scheme: "https",
        method: "GET",
        uri: "/api/users/7",
        request_uri: "/api/users/7?page=2&sort=name",
        args: "page=2&sort=name",
        headers: &headers,
        request_id: "4bf92f3577b34da6a3ce929d0e0e4736",
        server_name: "api.example.com",
        server_port: 443,
        captures: &[],
        named: &[],
        claims: None,
    };
    let mut g = c.benchmark_group("vars");
    for (name, text) in [
        ("literal", "tollgate"),
        ("cache_key", "$scheme$host$request_uri"),
        ("remote_addr", "$remote_addr"),
        ("arg", "$arg_sort"),
        ("header", "$http_x_user"),
        ("cookie", "$cookie_theme"),
    ] {
        let t = template(text);
        g.bench_function(name, |b| b.iter(|| vars.render(black_box(&t))));
    }
    g.finish();

    // The gateway's own headers, as prepare() sets them for a plain
    // proxied request.
    let own = http::Request::get("/api/items?sort=asc")
        .body(())
        .expect("request")
        .into_parts()
        .0;
    let list: Vec<(HeaderName, HeaderValue)> = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "api.example.com"),
        ("x-real-ip", "203.0.113.9"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("host", "10.0.0.7:8080"),
    ]
    .into_iter()
    .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
    .collect();
    let mut g = c.benchmark_group("upstream_head");
    let mut w = Vec::with_capacity(1024);
    // Learned once per request on the way in, as the handler does.
    let seen = tollgate::proxy::headers::Seen::of(&headers, None);
    g.bench_function("encode_8_client_headers", |b| {
        b.iter(|| {
            w.clear();
            encode_head(
                &mut w,
                black_box(&own),
                Some(Passthrough {
                    headers: black_box(&headers),
                    seen,
                    skip: &[],
                    own: black_box(&list),
                }),
                false,
                None,
            )
        })
    });
    g.finish();

    // The names the request path looks up (most absent), in wrk's one-field
    // head and in the browser-like one above (`headers::get` scans up to
    // its threshold and hashes above it; `HeaderMap::get` always hashes).
    let names = [
        http::header::HOST,
        HeaderName::from_static("x-forwarded-for"),
        HeaderName::from_static("traceparent"),
        HeaderName::from_static("x-request-id"),
        http::header::CONNECTION,
        http::header::CONTENT_LENGTH,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
    ];
    let mut one = HeaderMap::new();
    one.insert(
        http::header::HOST,
        HeaderValue::from_static("api.example.com"),
    );
    let mut g = c.benchmark_group("lookup_8_names");
    for (label, map) in [("1_field", &one), ("8_fields", &headers)] {
        g.bench_function(format!("headers_get_{label}"), |b| {
            b.iter(|| {
                names
                    .iter()
                    .filter(|n| tollgate::proxy::headers::get(black_box(map), n).is_some())
                    .count()
            })
        });
        g.bench_function(format!("map_get_{label}"), |b| {
            b.iter(|| {
                names
                    .iter()
                    .filter(|n| black_box(map).get(*n).is_some())
                    .count()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

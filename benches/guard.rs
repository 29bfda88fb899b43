//! The connection guard's scanner on the hot path: the cost per request
//! head (what every HTTP/1 request pays) and per body byte.
//!
//! `cargo bench --bench guard`; the numbers go to bench/RESULTS.md.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tollgate::config::model::ClientLimits;
use tollgate::server::guard::{GuardLimits, Scanner};

/// A typical browser-ish request head (~500 bytes).
const HEAD: &[u8] = b"GET /api/v1/orders/12345?expand=items&limit=20 HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-GB,en;q=0.9\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.abcdefghijklmnopqrstuvwxyz012345\r\n\
X-Request-Id: 4bf92f3577b34da6a3ce929d0e0e4736\r\n\
Connection: keep-alive\r\n\r\n";

fn bench(c: &mut Criterion) {
    let limits = GuardLimits::new(&ClientLimits::default());
    let mut g = c.benchmark_group("guard");
    g.throughput(Throughput::Bytes(HEAD.len() as u64));
    g.bench_function("head_500B", |b| {
        b.iter(|| {
            let mut s = Scanner::new(limits);
            black_box(s.feed(black_box(HEAD)))
        })
    });
    let mut cookie = HEAD[..HEAD.len() - 2].to_vec();
    cookie.extend_from_slice(b"Cookie: ");
    cookie.extend_from_slice(&[b'c'; 4096]);
    cookie.extend_from_slice(b"\r\n\r\n");
    g.throughput(Throughput::Bytes(cookie.len() as u64));
    g.bench_function("head_with_4KiB_cookie", |b| {
        b.iter(|| {
            let mut s = Scanner::new(limits);
            black_box(s.feed(black_box(&cookie)))
        })
    });
    let mut pipelined = Vec::new();
    for _ in 0..100 {
        pipelined.extend_from_slice(HEAD);
    }
    g.throughput(Throughput::Bytes(pipelined.len() as u64));
    g.bench_function("100_pipelined_heads", |b| {
        b.iter(|| {
            let mut s = Scanner::new(limits);
            black_box(s.feed(black_box(&pipelined)))
        })
    });
    let mut post =
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..16 {
        post.extend_from_slice(b"4000\r\n");
        post.extend_from_slice(&[b'x'; 0x4000]);
        post.extend_from_slice(b"\r\n");
    }
    post.extend_from_slice(b"0\r\n\r\n");
    g.throughput(Throughput::Bytes(post.len() as u64));
    g.bench_function("chunked_256KiB_body", |b| {
        b.iter(|| {
            let mut s = Scanner::new(limits);
            black_box(s.feed(black_box(&post)))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

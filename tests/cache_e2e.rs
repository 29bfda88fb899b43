//! LANGUAGE.md §8 and `wrap_response` (§4) end to end through the real
//! binary: hits and misses, coalescing counted at the upstream, stale on
//! error, purge through the admin listener, response wrapping.

mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use util::*;

fn cache_gateway(up: &TestUpstream, admin_port: u16) -> Gateway {
    Gateway::start(&format!(
        r#"
admin {{ listen 127.0.0.1:{admin_port}; }}
cache products {{ max_size 10m; ttl 1m; stale_if_error 5m; }}
access_log off;
server {{
    listen @PORT@;
    location /api/products {{ cache products; proxy_pass http://{up}; }}
    location /api/wrapped {{ wrap_response on; proxy_pass http://{up}; }}
}}
"#,
        up = up.addr()
    ))
}

#[test]
fn miss_then_hit_with_status_on_every_response() {
    let up = TestUpstream::with("up", |_| {
        Reply::json(serde_json::json!({"id": 3})).header("cache-control", "max-age=60")
    });
    let gw = cache_gateway(&up, free_port());
    let c = Client::new();
    let first = c.get(&gw.url("/api/products/3"));
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache-status").as_deref(), Some("MISS"));
    let second = c.get(&gw.url("/api/products/3"));
    assert_eq!(second.header("x-cache-status").as_deref(), Some("HIT"));
    assert_eq!(second.json()["id"], 3);
    assert!(second.header("age").is_some());
    assert!(second.header("x-request-id").is_some());
    // Each once, and nothing of how the entry is kept.
    for name in ["x-cache-status", "age", "x-request-id", "content-type"] {
        assert_eq!(second.headers.get_all(name).iter().count(), 1, "{name}");
    }
    assert!(!second.headers.contains_key("x-tollgate-spare-slot"));
    assert_ne!(first.header("x-request-id"), second.header("x-request-id"));
    assert_eq!(up.count(), 1);
    // POST is not a cached method: it goes upstream and says BYPASS.
    let post = c.request("POST", &gw.url("/api/products/3"), &[], "x");
    assert_eq!(post.header("x-cache-status").as_deref(), Some("BYPASS"));
    assert_eq!(up.count(), 2);
}

#[test]
fn no_store_and_set_cookie_are_not_cached() {
    let up = TestUpstream::with("up", |r| {
        if r.target.contains("cookie") {
            Reply::text("c")
                .header("set-cookie", "a=b")
                .header("cache-control", "max-age=60")
        } else {
            Reply::text("n").header("cache-control", "no-store")
        }
    });
    let gw = cache_gateway(&up, free_port());
    let c = Client::new();
    for path in ["/api/products/cookie", "/api/products/nostore"] {
        c.get(&gw.url(path));
        let r = c.get(&gw.url(path));
        assert_ne!(r.header("x-cache-status").as_deref(), Some("HIT"), "{path}");
    }
    assert_eq!(up.count(), 4);
}

#[test]
fn concurrent_misses_are_coalesced_into_one_upstream_request() {
    let up = TestUpstream::with("up", |_| {
        Reply::json(serde_json::json!({"ok": true}))
            .header("cache-control", "max-age=60")
            .delay(Duration::from_millis(300))
    });
    let gw = cache_gateway(&up, free_port());
    let url = gw.url("/api/products/hot");
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || Client::fresh().get(&url))
        })
        .collect();
    let results: Vec<Resp> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    assert!(results.iter().all(|r| r.status == 200));
    assert_eq!(
        up.count(),
        1,
        "20 concurrent misses for one key make one upstream request"
    );
}

#[test]
fn stale_if_error_serves_the_old_entry_when_the_upstream_fails() {
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let up = TestUpstream::with("up", move |_| {
        if f.load(Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::text("fresh").header("cache-control", "max-age=0")
        }
    });
    let gw = cache_gateway(&up, free_port());
    let c = Client::new();
    assert_eq!(c.get(&gw.url("/api/products/s")).text(), "fresh");
    failing.store(true, Ordering::SeqCst);
    let r = c.get(&gw.url("/api/products/s"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "fresh");
    assert_eq!(r.header("x-cache-status").as_deref(), Some("STALE"));
}

#[test]
fn purge_through_the_admin_listener() {
    let up = TestUpstream::with("up", |_| {
        Reply::text("v").header("cache-control", "max-age=60")
    });
    let admin = free_port();
    let gw = cache_gateway(&up, admin);
    let c = Client::new();
    c.get(&gw.url("/api/products/1"));
    c.get(&gw.url("/api/products/2"));
    assert_eq!(
        c.get(&gw.url("/api/products/1"))
            .header("x-cache-status")
            .as_deref(),
        Some("HIT")
    );
    // The default key is $scheme$host$request_uri.
    let key = "http127.0.0.1/api/products/1";
    let r = c.request(
        "DELETE",
        &format!("http://127.0.0.1:{admin}/cache/products?key={key}"),
        &[],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["purged"], 1);
    assert_eq!(
        c.get(&gw.url("/api/products/1"))
            .header("x-cache-status")
            .as_deref(),
        Some("MISS")
    );
    let r = c.request(
        "DELETE",
        &format!("http://127.0.0.1:{admin}/cache/products"),
        &[],
        "",
    );
    assert!(r.json()["purged"].as_u64().expect("count") >= 2);
    assert_eq!(
        c.request(
            "DELETE",
            &format!("http://127.0.0.1:{admin}/cache/nope"),
            &[],
            ""
        )
        .status,
        404
    );
}

#[test]
fn wrap_response_wraps_json_and_leaves_the_rest() {
    let up = TestUpstream::with("up", |r| {
        if r.target.ends_with("json") {
            Reply::json(serde_json::json!({"a": 1}))
        } else {
            Reply::text("plain")
        }
    });
    let gw = cache_gateway(&up, free_port());
    let r = request(
        "GET",
        &gw.url("/api/wrapped/json"),
        &[("x-request-id", "corr-1")],
        "",
    );
    let v = r.json();
    assert_eq!(v["data"], serde_json::json!({"a": 1}));
    assert_eq!(v["correlationId"], "corr-1");
    assert!(v["timestamp"].as_str().is_some_and(|t| t.contains('T')));
    assert_eq!(
        r.header("content-length")
            .map(|l| l.parse::<usize>().expect("len")),
        Some(r.body.len())
    );
    assert_eq!(get(&gw.url("/api/wrapped/text")).text(), "plain");
}

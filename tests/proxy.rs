//! LANGUAGE.md §3, §4, §5 and §9 end to end: the real binary over real
//! sockets, in front of real upstreams on 127.0.0.1:0.

mod util;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use util::*;

/// One server on `@PORT@` with `body` inside; `UP` is replaced by `up`'s address.
fn gateway(up: &TestUpstream, body: &str) -> Gateway {
    Gateway::start(&format!(
        "server {{\n    listen @PORT@;\n{}\n}}\n",
        body.replace("UP", &up.addr())
    ))
}

/// The target the upstream received for `path`.
fn target_for(gw: &Gateway, up: &TestUpstream, path: &str) -> String {
    let r = get(&gw.url(path));
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    up.last().target
}

// ---------------------------------------------------------------- proxy_pass URI rules (§4, §13.3)

#[test]
fn proxy_pass_without_uri_sends_the_original_target() {
    let up = TestUpstream::start("up");
    let gw = gateway(&up, "location /api/ { proxy_pass http://UP; }");
    assert_eq!(target_for(&gw, &up, "/api/x?q=1"), "/api/x?q=1");
    // Un-normalized and encoded as received, query untouched.
    assert_eq!(
        target_for(&gw, &up, "/api/a%2Fb/./c//d?x=%20y&z"),
        "/api/a%2Fb/./c//d?x=%20y&z"
    );
    assert_eq!(target_for(&gw, &up, "/api/caf%C3%A9"), "/api/caf%C3%A9");
}

#[test]
fn proxy_pass_with_uri_replaces_the_matched_prefix() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        "location /api/ { proxy_pass http://UP/v1/; }
         location /api { proxy_pass http://UP/users; }
         location = /login { proxy_pass http://UP/auth/login; }",
    );
    assert_eq!(target_for(&gw, &up, "/api/x?q=1"), "/v1/x?q=1");
    assert_eq!(target_for(&gw, &up, "/api/a/b"), "/v1/a/b");
    assert_eq!(target_for(&gw, &up, "/api7"), "/users7");
    assert_eq!(
        target_for(&gw, &up, "/login?next=%2Fhome"),
        "/auth/login?next=%2Fhome"
    );
    // The normalized path is what is spliced.
    assert_eq!(target_for(&gw, &up, "/api/a/../b"), "/v1/b");
    // `/api` exactly: `location /api` (no redirect, `/api/` is not its name).
    assert_eq!(target_for(&gw, &up, "/api"), "/users");
}

#[test]
fn proxy_pass_prefix_without_slash_rewrites_ids() {
    let up = TestUpstream::start("up");
    let gw = gateway(&up, "location /api { proxy_pass http://UP/users; }");
    assert_eq!(target_for(&gw, &up, "/api/7"), "/users/7");
    assert_eq!(target_for(&gw, &up, "/api/7?full=1"), "/users/7?full=1");
}

#[test]
fn regex_locations_send_the_original_target_or_the_full_variable_uri() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        r#"location ~ ^/r/([0-9]+)$ { proxy_pass http://UP; }
           location ~ ^/u/([0-9]+)$ { proxy_pass http://UP/users/$1; }
           location ~ ^/n/(?<id>[0-9]+)$ { proxy_pass http://UP/items/$id/detail; }"#,
    );
    assert_eq!(target_for(&gw, &up, "/r/5?x=1"), "/r/5?x=1");
    // A URI with variables is the full upstream URI: no query appended.
    assert_eq!(target_for(&gw, &up, "/u/5?x=1"), "/users/5");
    assert_eq!(target_for(&gw, &up, "/n/42?x=1"), "/items/42/detail");
}

#[test]
fn rewrite_break_changes_the_path_and_keeps_the_query() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        r#"location /old/ { rewrite ^/old/(.*)$ /new/$1 break; proxy_pass http://UP; }
           location /old2/ { rewrite ^/old2/(.*)$ /new2/$1 break; proxy_pass http://UP/ignored/; }
           location /nomatch/ { rewrite ^/other/(.*)$ /x/$1 break; proxy_pass http://UP/kept/; }"#,
    );
    assert_eq!(target_for(&gw, &up, "/old/a/b?q=1"), "/new/a/b?q=1");
    // §13.3: after a rewrite the URI part is ignored.
    assert_eq!(target_for(&gw, &up, "/old2/a?q=1"), "/new2/a?q=1");
    // A rewrite that does not match leaves the URI rule in force.
    assert_eq!(target_for(&gw, &up, "/nomatch/z?q=2"), "/kept/z?q=2");
}

#[test]
fn spliced_paths_are_re_escaped() {
    let up = TestUpstream::start("up");
    let gw = gateway(&up, "location /api/ { proxy_pass http://UP/v1/; }");
    assert_eq!(target_for(&gw, &up, "/api/caf%C3%A9"), "/v1/caf%C3%A9");
    assert_eq!(target_for(&gw, &up, "/api/a%20b"), "/v1/a%20b");
    // A decoded `?` or `%` must not turn into a query or an escape upstream.
    assert_eq!(target_for(&gw, &up, "/api/a%3Fb?c=d"), "/v1/a%3Fb?c=d");
    assert_eq!(target_for(&gw, &up, "/api/100%25"), "/v1/100%25");
}

#[test]
fn rewrite_replacement_with_a_query_gets_the_original_args_appended() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        r#"location /s/ { rewrite ^/s/(.*)$ /search?term=$1 break; proxy_pass http://UP; }"#,
    );
    assert_eq!(
        target_for(&gw, &up, "/s/rust?page=2"),
        "/search?term=rust&page=2"
    );
    assert_eq!(target_for(&gw, &up, "/s/rust"), "/search?term=rust");
}

// ---------------------------------------------------------------- return, 404, redirects

#[test]
fn return_text_redirect_and_bare_code() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        r#"location = /t { return 200 "hello $request_method"; }
           location = /moved { return 301 https://example.com/new$request_uri; }
           location = /gone { return 404; }
           location = /found { return 302 /elsewhere; }
           location = /q { return 200 "$uri$is_args$args"; }"#,
    );
    let r = get(&gw.url("/t"));
    assert_eq!((r.status, r.text().as_str()), (200, "hello GET"));
    let r = get(&gw.url("/moved?a=1"));
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://example.com/new/moved?a=1")
    );
    assert_eq!(get(&gw.url("/q?a=1&b")).text(), "/q?a=1&b");
    assert_eq!(get(&gw.url("/q")).text(), "/q");
    assert_eq!(get(&gw.url("/gone")).status, 404);
    let r = get(&gw.url("/found"));
    assert_eq!(
        (r.status, r.header("location").as_deref()),
        (302, Some("/elsewhere"))
    );
    assert_eq!(up.count(), 0);
}

#[test]
fn no_matching_location_is_a_json_404_with_the_request_id() {
    let up = TestUpstream::start("up");
    let gw = gateway(&up, "location /api/ { proxy_pass http://UP; }");
    let r = get(&gw.url("/nothing/here"));
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let j = r.json();
    assert_eq!(j["status"], 404);
    assert!(j["error"].is_string());
    let id = r.header("x-request-id").expect("request id header");
    assert_eq!(j["request_id"], id.as_str());
}

#[test]
fn trailing_slash_redirect_keeps_the_query_unless_an_exact_location_exists() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        r#"location /x/ { proxy_pass http://UP; }
           location /y/ { proxy_pass http://UP; }
           location = /y { return 200 "exact y"; }
           location /z/ { return 200 "z"; }"#,
    );
    let r = get(&gw.url("/x?a=1&b=2"));
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location").as_deref(), Some("/x/?a=1&b=2"));
    let r = get(&gw.url("/x"));
    assert_eq!(
        (r.status, r.header("location").as_deref()),
        (301, Some("/x/"))
    );
    let r = get(&gw.url("/y"));
    assert_eq!((r.status, r.text().as_str()), (200, "exact y"));
    // Only proxy_pass locations redirect (NGINX auto_redirect).
    assert_eq!(get(&gw.url("/z")).status, 404);
    assert_eq!(up.count(), 0);
}

#[test]
fn trailing_slash_redirect_beats_regexes_and_shorter_prefixes() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        r#"location / { return 200 root; }
           location /x/ { proxy_pass http://UP; }
           location ~ ^/x$ { return 200 regex; }"#,
    );
    let r = get(&gw.url("/x"));
    assert_eq!(
        (r.status, r.header("location").as_deref()),
        (301, Some("/x/"))
    );
    assert_eq!(target_for(&gw, &up, "/x/"), "/x/");
}

// ---------------------------------------------------------------- normalization (§3, §13.4)

#[test]
fn routing_uses_the_normalized_path() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        r#"location /b/ { return 200 "b $uri"; }
           location / { return 200 "root $uri"; }"#,
    );
    for (path, want) in [
        ("/a/../b/x", "b /b/x"),
        ("//b//x", "b /b/x"),
        ("/a/%2e%2e/b/x", "b /b/x"),
        ("/%62/x", "b /b/x"),
        ("/b/./x", "b /b/x"),
        ("/a/b/..", "root /a/"),
    ] {
        let r = get(&gw.url(path));
        assert_eq!((r.status, r.text().as_str()), (200, want), "{path}");
    }
}

#[test]
fn climbing_above_the_root_and_malformed_targets_are_400() {
    let up = TestUpstream::start("up");
    let gw = gateway(&up, "location / { proxy_pass http://UP; }");
    for target in [
        "/../etc/passwd",
        "/a/../../x",
        "/%2e%2e/x",
        "/a%2F..%2F..%2Fx",
        "/bad%zzescape",
        "/nul%00",
    ] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let resp = raw(&gw.addr(), req.as_bytes());
        assert_eq!(
            raw_status(&resp),
            400,
            "{target}: {}",
            String::from_utf8_lossy(&resp)
        );
    }
    // Host: missing or duplicated on HTTP/1.1.
    let resp = raw(&gw.addr(), b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_status(&resp), 400);
    let resp = raw(
        &gw.addr(),
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&resp), 400);
    let body = String::from_utf8_lossy(&resp).into_owned();
    assert!(body.contains("\"request_id\""), "{body}");
    assert_eq!(up.count(), 0);
}

// ---------------------------------------------------------------- precedence (§3)

#[test]
fn location_precedence_follows_the_nginx_docs_example() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        r#"location = / { return 200 A; }
           location / { return 200 B; }
           location /documents/ { return 200 C; }
           location ^~ /images/ { return 200 D; }
           location ~* \.(gif|jpg|jpeg)$ { return 200 E; }
           location /documents/deep/ { return 200 F; }
           location ~ ^/documents/deep/.*\.png$ { return 200 G; }
           location ~ \.png$ { return 200 H; }
           location /p { return 200 P; }"#,
    );
    for (path, want) in [
        ("/", "A"),
        ("/index.html", "B"),
        ("/documents/document.html", "C"),
        ("/images/1.gif", "D"),
        ("/documents/1.jpg", "E"),
        ("/documents/1.JPG", "E"),
        ("/documents/deep/x.html", "F"),
        // Regexes in file order, before the longest prefix.
        ("/documents/deep/x.png", "G"),
        ("/other/x.png", "H"),
        // Prefixes compare bytes, not segments.
        ("/pfoo", "P"),
    ] {
        let r = get(&gw.url(path));
        assert_eq!((r.status, r.text().as_str()), (200, want), "{path}");
    }
}

#[test]
fn server_selection_by_host_on_one_port() {
    let gw = Gateway::start(
        r#"
server { listen @PORT@; server_name first.test; location / { return 200 first; } }
server { listen @PORT@; server_name example.com; location / { return 200 exact; } }
server { listen @PORT@; server_name *.example.com; location / { return 200 leading; } }
server { listen @PORT@; server_name *.b.example.com; location / { return 200 longer; } }
server { listen @PORT@; server_name www.example.*; location / { return 200 trailing; } }
server { listen @PORT@; server_name ~^api[0-9]+\.test$; location / { return 200 regex; } }
server { listen @PORT@ default_server; server_name fallback.test; location / { return 200 default; } }
"#,
    );
    let c = Client::new();
    for (host, want) in [
        ("example.com", "exact"),
        ("EXAMPLE.com:8080", "exact"),
        ("www.example.com", "leading"),
        ("a.b.example.com", "longer"),
        ("www.example.org", "trailing"),
        ("api7.test", "regex"),
        ("first.test", "first"),
        ("unknown.test", "default"),
    ] {
        let r = c.request("GET", &gw.url("/"), &[("host", host)], "");
        assert_eq!((r.status, r.text().as_str()), (200, want), "{host}");
    }
}

// ---------------------------------------------------------------- forwarded headers (§4, §13.7)

#[test]
fn forwarded_headers_are_set_and_appended() {
    let up = TestUpstream::start("up");
    let gw = gateway(&up, "location / { proxy_pass http://UP; }");
    let r = request(
        "GET",
        &gw.url("/h"),
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "6.6.6.6"),
        ],
        "",
    );
    assert_eq!(r.status, 200);
    let got = up.last();
    assert_eq!(
        got.header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(got.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(got.header("x-forwarded-host"), Some(gw.addr()));
    assert_eq!(got.header("x-real-ip").as_deref(), Some("127.0.0.1"));
    // The upstream server's host:port, like changeOrigin.
    assert_eq!(got.header("host"), Some(up.addr()));

    get(&gw.url("/h"));
    assert_eq!(
        up.last().header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
}

#[test]
fn real_ip_from_a_trusted_proxy_sets_remote_addr() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        "set_real_ip_from 127.0.0.1;
         set_real_ip_from 10.0.0.0/8;
         real_ip_header X-Forwarded-For;
         proxy_set_header X-Client $remote_addr;
         location / { proxy_pass http://UP; }",
    );
    request(
        "GET",
        &gw.url("/"),
        &[("x-forwarded-for", "198.51.100.1, 203.0.113.9, 10.1.2.3")],
        "",
    );
    let got = up.last();
    // Walk from the right past trusted hops: 10.1.2.3 is trusted, 203.0.113.9 is not.
    assert_eq!(got.header("x-client").as_deref(), Some("203.0.113.9"));
    assert_eq!(got.header("x-real-ip").as_deref(), Some("203.0.113.9"));
    // X-Forwarded-For gets the TCP peer (§13.7).
    assert_eq!(
        got.header("x-forwarded-for").as_deref(),
        Some("198.51.100.1, 203.0.113.9, 10.1.2.3, 127.0.0.1")
    );

    get(&gw.url("/"));
    assert_eq!(up.last().header("x-client").as_deref(), Some("127.0.0.1"));
}

#[test]
fn untrusted_peers_cannot_set_remote_addr() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        "set_real_ip_from 10.0.0.0/8;
         real_ip_header X-Forwarded-For;
         proxy_set_header X-Client $remote_addr;
         location / { proxy_pass http://UP; }",
    );
    request(
        "GET",
        &gw.url("/"),
        &[("x-forwarded-for", "198.51.100.1")],
        "",
    );
    assert_eq!(up.last().header("x-client").as_deref(), Some("127.0.0.1"));
}

#[test]
fn host_is_the_upstream_server_unless_set_to_host() {
    let up = TestUpstream::start("up");
    let port = up.addr().rsplit(':').next().expect("port").to_string();
    let gw = Gateway::start(&format!(
        "upstream backend {{ server 127.0.0.1:{port}; }}
server {{
    listen @PORT@;
    location /named/ {{ proxy_pass http://backend; }}
    location /host/ {{ proxy_set_header Host $host; proxy_pass http://backend; }}
    location /raw/ {{ proxy_set_header Host $http_host; proxy_pass http://127.0.0.1:{port}; }}
}}"
    ));
    let c = Client::new();
    c.request(
        "GET",
        &gw.url("/named/"),
        &[("host", "Api.Example.COM:8080")],
        "",
    );
    assert_eq!(up.last().header("host"), Some(format!("127.0.0.1:{port}")));
    c.request(
        "GET",
        &gw.url("/host/"),
        &[("host", "Api.Example.COM:8080")],
        "",
    );
    assert_eq!(up.last().header("host").as_deref(), Some("api.example.com"));
    c.request(
        "GET",
        &gw.url("/raw/"),
        &[("host", "Api.Example.COM:8080")],
        "",
    );
    assert_eq!(
        up.last().header("host").as_deref(),
        Some("Api.Example.COM:8080")
    );
    assert_eq!(
        up.last().header("x-forwarded-host").as_deref(),
        Some("Api.Example.COM:8080")
    );
}

#[test]
fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let up = TestUpstream::with("up", |_| {
        Reply::text("ok")
            .header("connection", "x-secret")
            .header("x-secret", "s")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-kept", "yes")
    });
    let gw = gateway(&up, "location / { proxy_pass http://UP; }");
    let r = request(
        "GET",
        &gw.url("/"),
        &[
            ("connection", "keep-alive, x-drop-me"),
            ("x-drop-me", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("x-keep-me", "2"),
        ],
        "",
    );
    assert_eq!(r.status, 200);
    let got = up.last();
    for h in [
        "x-drop-me",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert_eq!(got.header(h), None, "{h} reached the upstream");
    }
    assert_eq!(got.header("x-keep-me").as_deref(), Some("2"));
    for h in ["x-secret", "keep-alive", "proxy-authenticate"] {
        assert_eq!(r.header(h), None, "{h} reached the client");
    }
    assert_eq!(r.header("x-kept").as_deref(), Some("yes"));
}

/// HTTP/1 clients get an upstream's header lines passed through as they
/// came (not parsed into a map and written again); HTTP/2 clients get them
/// from the map. Both see the same headers: the upstream's own, minus what
/// the map would have lost (hop-by-hop, `Connection`-listed, hidden), with
/// the gateway's request id and rate-limit headers replacing the
/// upstream's and `add_header` appending.
#[test]
fn upstream_headers_reach_http1_and_http2_clients_alike() {
    let up = TestUpstream::with("up", |_| {
        Reply::text("ok")
            .header("connection", "x-secret")
            .header("x-secret", "s")
            .header("x-request-id", "the-upstreams")
            .header("ratelimit-limit", "999")
            .header("x-powered-by", "php")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .header("x-gw", "upstream")
            .header("cache-control", "max-age=5")
    });
    let gw = Gateway::start(&format!(
        "rate_limit roomy {{ key $remote_addr; rate 1000r/s; burst 1000; }}\n\
         server {{\n    listen @PORT@;\n    location / {{\n        rate_limit roomy;\n        \
         add_header X-Gw gateway;\n        proxy_hide_header X-Powered-By;\n        \
         proxy_pass http://{};\n    }}\n}}\n",
        up.addr()
    ));
    let h1 = Client::new().get(&gw.url("/x"));
    let h2 = Client::h2().get(&gw.url("/x"));
    for (proto, r) in [("HTTP/1.1", &h1), ("HTTP/2", &h2)] {
        assert_eq!(r.status, 200, "{proto}: {}", r.text());
        assert_eq!(r.text(), "ok", "{proto}");
        let all = |n: &str| -> Vec<String> {
            r.headers
                .get_all(n)
                .iter()
                .map(|v| v.to_str().expect("ascii").to_string())
                .collect()
        };
        assert_eq!(all("set-cookie"), ["a=1", "b=2"], "{proto}");
        assert_eq!(all("x-gw"), ["upstream", "gateway"], "{proto}");
        assert_eq!(all("cache-control"), ["max-age=5"], "{proto}");
        let id = all("x-request-id");
        assert_eq!(id.len(), 1, "{proto}: {id:?}");
        assert_ne!(id[0], "the-upstreams", "{proto}");
        assert_eq!(all("ratelimit-limit").len(), 1, "{proto}");
        assert_ne!(all("ratelimit-limit")[0], "999", "{proto}");
        for gone in ["x-secret", "x-powered-by"] {
            assert!(all(gone).is_empty(), "{proto}: {gone} reached the client");
        }
        assert_eq!(all("date").len(), 1, "{proto}");
        assert_eq!(all("content-length"), ["2"], "{proto}");
    }
}

#[test]
fn proxy_set_header_sets_and_empty_removes_and_hide_header_drops() {
    let up = TestUpstream::with("up", |_| {
        Reply::text("ok")
            .header("x-powered-by", "php")
            .header("x-other", "o")
    });
    let gw = gateway(
        &up,
        r#"location / {
               proxy_set_header X-Remove "";
               proxy_set_header X-Real-IP "";
               proxy_set_header X-Added "m=$request_method a=$arg_a";
               proxy_hide_header X-Powered-By;
               proxy_pass http://UP;
           }"#,
    );
    let r = request(
        "GET",
        &gw.url("/?a=7"),
        &[("x-remove", "1"), ("x-added", "client")],
        "",
    );
    assert_eq!(r.status, 200);
    let got = up.last();
    assert_eq!(got.header("x-remove"), None);
    assert_eq!(got.header("x-real-ip"), None);
    assert_eq!(got.header("x-added").as_deref(), Some("m=GET a=7"));
    assert_eq!(r.header("x-powered-by"), None);
    assert_eq!(r.header("x-other").as_deref(), Some("o"));
}

#[test]
fn add_header_on_success_only_unless_always() {
    let up = TestUpstream::with("up", |r| {
        if r.target.starts_with("/missing") {
            Reply::status(404)
        } else {
            Reply::echo()
        }
    });
    let gw = gateway(
        &up,
        r#"location / {
               add_header X-A a;
               add_header X-B b always;
               proxy_pass http://UP;
           }
           location = /r404 { add_header X-A a; add_header X-B b always; return 404; }
           location = /r301 { add_header X-A a; return 301 /x; }"#,
    );
    let r = get(&gw.url("/ok"));
    assert_eq!(
        (r.header("x-a").as_deref(), r.header("x-b").as_deref()),
        (Some("a"), Some("b"))
    );
    let r = get(&gw.url("/missing"));
    assert_eq!(r.status, 404);
    assert_eq!(
        (r.header("x-a"), r.header("x-b").as_deref()),
        (None, Some("b"))
    );
    let r = get(&gw.url("/r404"));
    assert_eq!(
        (r.header("x-a"), r.header("x-b").as_deref()),
        (None, Some("b"))
    );
    let r = get(&gw.url("/r301"));
    assert_eq!((r.status, r.header("x-a").as_deref()), (301, Some("a")));
}

#[test]
fn add_header_values_with_variables_are_rendered_and_an_empty_one_is_not_sent() {
    let up = TestUpstream::with("up", |_| Reply::echo());
    let gw = gateway(
        &up,
        r#"location / {
               add_header X-Method $request_method;
               add_header X-Arg $arg_x;
               add_header X-Blank "";
               add_header X-Fixed "one value";
               proxy_pass http://UP;
           }"#,
    );
    let r = get(&gw.url("/a?x=7"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-method").as_deref(), Some("GET"));
    assert_eq!(r.header("x-arg").as_deref(), Some("7"));
    assert_eq!(r.header("x-fixed").as_deref(), Some("one value"));
    assert_eq!(r.header("x-blank"), None);
    // The same location, the variable empty this time: no header.
    let r = get(&gw.url("/a"));
    assert_eq!(r.header("x-arg"), None);
    assert_eq!(r.header("x-fixed").as_deref(), Some("one value"));
}

#[test]
fn server_level_headers_are_inherited_and_replaced_by_name() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        r#"add_header X-S server;
           add_header X-Same server;
           proxy_set_header X-Up-S server;
           proxy_set_header X-Up-Same server;
           location /a/ {
               add_header X-Same loc;
               proxy_set_header X-Up-Same loc;
               proxy_pass http://UP;
           }
           location /b/ { proxy_pass http://UP; }"#,
    );
    let r = get(&gw.url("/a/"));
    assert_eq!(r.header("x-s").as_deref(), Some("server"));
    assert_eq!(
        r.headers.get_all("x-same").iter().collect::<Vec<_>>(),
        vec!["loc"]
    );
    let got = up.last();
    assert_eq!(got.header("x-up-s").as_deref(), Some("server"));
    assert_eq!(got.header("x-up-same").as_deref(), Some("loc"));
    let r = get(&gw.url("/b/"));
    assert_eq!(r.header("x-same").as_deref(), Some("server"));
    assert_eq!(up.last().header("x-up-same").as_deref(), Some("server"));
}

#[test]
fn request_id_generated_kept_or_replaced_and_sent_both_ways() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        "location /a/ { proxy_pass http://UP; }
         location /c/ { request_id_header X-Correlation-Id; proxy_pass http://UP; }",
    );
    let c = Client::new();
    // Generated.
    let r = c.get(&gw.url("/a/"));
    let id = r.header("x-request-id").expect("generated id");
    assert!(!id.is_empty() && id.len() <= 128);
    assert_eq!(up.last().header("x-request-id"), Some(id.clone()));
    let r2 = c.get(&gw.url("/a/"));
    assert_ne!(r2.header("x-request-id"), Some(id), "ids must be unique");
    // Kept when sane.
    let sane = "abc-123.X:y_z";
    let r = c.request("GET", &gw.url("/a/"), &[("x-request-id", sane)], "");
    assert_eq!(r.header("x-request-id").as_deref(), Some(sane));
    assert_eq!(up.last().header("x-request-id").as_deref(), Some(sane));
    // Replaced when not.
    let long = "a".repeat(200);
    for bad in [long.as_str(), "has space", "semi;colon"] {
        let r = c.request("GET", &gw.url("/a/"), &[("x-request-id", bad)], "");
        let got = r.header("x-request-id").expect("id");
        assert_ne!(got, bad);
        assert!(
            got.len() <= 128
                && got
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        );
        assert_eq!(up.last().header("x-request-id"), Some(got));
    }
    // Custom header name.
    let r = c.request("GET", &gw.url("/c/"), &[("x-correlation-id", "corr-1")], "");
    assert_eq!(r.header("x-correlation-id").as_deref(), Some("corr-1"));
    assert_eq!(
        up.last().header("x-correlation-id").as_deref(),
        Some("corr-1")
    );
    let r = c.get(&gw.url("/c/"));
    let id = r.header("x-correlation-id").expect("generated");
    assert_eq!(up.last().header("x-correlation-id"), Some(id));
}

#[test]
fn gateway_errors_carry_the_locations_request_id_header() {
    let port = free_port();
    let gw = Gateway::start(&format!(
        "server {{ listen @PORT@; location / {{ request_id_header X-Correlation-Id; add_header X-B b always; proxy_pass http://127.0.0.1:{port}; }} }}"
    ));
    let r = request("GET", &gw.url("/"), &[("x-correlation-id", "corr-502")], "");
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-correlation-id").as_deref(), Some("corr-502"));
    assert_eq!(r.json()["request_id"], "corr-502");
    assert_eq!(r.header("x-b").as_deref(), Some("b"));
}

#[test]
fn server_level_return_answers_every_path() {
    let up = TestUpstream::start("up");
    let gw = Gateway::start(&format!(
        "server {{ listen @PORT@; server_name old.test; return 301 https://new.test$request_uri; location / {{ proxy_pass http://{}; }} }}
server {{ listen @PORT@ default_server; location / {{ proxy_pass http://{}; }} }}",
        up.addr(),
        up.addr()
    ));
    let r = request("GET", &gw.url("/a/b?c=1"), &[("host", "old.test")], "");
    assert_eq!(
        (r.status, r.header("location").as_deref()),
        (301, Some("https://new.test/a/b?c=1"))
    );
    assert_eq!(up.count(), 0);
    assert_eq!(get(&gw.url("/a")).status, 200);
    assert_eq!(up.count(), 1);
}

// ---------------------------------------------------------------- bodies

#[test]
fn client_max_body_size_is_413_for_content_length_and_chunked() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        "client_max_body_size 1k; location / { proxy_pass http://UP; }",
    );
    let r = request("POST", &gw.url("/"), &[], vec![b'x'; 2048]);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["status"], 413);
    // Within the limit.
    let r = request("POST", &gw.url("/"), &[], vec![b'x'; 1000]);
    assert_eq!(r.status, 200);
    assert_eq!(up.last().body.len(), 1000);
    // Chunked, no Content-Length.
    let mut req =
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            .to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'y'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(&gw.addr(), &req);
    assert_eq!(raw_status(&resp), 413, "{}", String::from_utf8_lossy(&resp));
    assert!(
        up.requests().iter().all(|r| r.body.len() <= 1024),
        "an oversized body reached the upstream"
    );
}

#[test]
fn large_bodies_stream_through_whole() {
    let up = TestUpstream::start("up");
    let gw = gateway(
        &up,
        "client_max_body_size 10m; location / { proxy_pass http://UP; }",
    );
    let body: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let r = request(
        "POST",
        &gw.url("/upload"),
        &[("content-type", "application/octet-stream")],
        body.clone(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], body.len());
    assert!(up.last().body == body, "the upstream got a different body");
}

// ---------------------------------------------------------------- errors

#[test]
fn upstream_refused_is_a_json_502() {
    let port = free_port();
    let gw = Gateway::start(&format!(
        "server {{ listen @PORT@; location / {{ proxy_pass http://127.0.0.1:{port}; }} }}"
    ));
    let r = get(&gw.url("/x"));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/json")
    );
    let j = r.json();
    assert_eq!(j["status"], 502);
    assert_eq!(
        j["request_id"].as_str(),
        r.header("x-request-id").as_deref()
    );
}

#[test]
fn slow_upstream_beyond_read_timeout_is_504() {
    let up = TestUpstream::with("slow", |_| Reply::echo().delay(Duration::from_secs(3)));
    let gw = gateway(
        &up,
        "location / { proxy_read_timeout 300ms; proxy_pass http://UP; }",
    );
    let r = get(&gw.url("/"));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["status"], 504);
    assert_eq!(up.count(), 1, "a timeout on the only server is not retried");
}

#[test]
fn read_timeout_is_whole_for_each_request_on_a_pooled_connection() {
    // The read timer is kept on the upstream connection and moved on
    // lazily: after it went off while the connection sat idle, the next
    // requests neither fail early nor lose their timeout.
    let up = TestUpstream::with("lazy", |r| {
        if r.target.starts_with("/slow") {
            Reply::echo().delay(Duration::from_millis(1500))
        } else {
            Reply::echo()
        }
    });
    let gw = gateway(
        &up,
        "location / { proxy_read_timeout 500ms; proxy_pass http://UP; }",
    );
    let client = Client::new();
    for _ in 0..3 {
        assert_eq!(client.request("GET", &gw.url("/fast"), &[], "").status, 200);
    }
    // Longer than the timeout: the timer set by the requests above fires
    // while the connection is idle.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(client.request("GET", &gw.url("/fast"), &[], "").status, 200);
    let t = std::time::Instant::now();
    let r = client.request("GET", &gw.url("/slow"), &[], "");
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1400),
        "504 after {took:?}, not after the 500ms timeout"
    );
    // And again right after (the timer now set for a later deadline).
    assert_eq!(client.request("GET", &gw.url("/fast"), &[], "").status, 200);
    let t = std::time::Instant::now();
    assert_eq!(client.request("GET", &gw.url("/slow"), &[], "").status, 504);
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn all_servers_down_is_503() {
    let (p1, p2) = (free_port(), free_port());
    let gw = Gateway::start(&format!(
        "upstream dead {{ server 127.0.0.1:{p1} max_fails=1 fail_timeout=30s; server 127.0.0.1:{p2} max_fails=1 fail_timeout=30s; }}
server {{ listen @PORT@; location / {{ proxy_pass http://dead; }} }}"
    ));
    let r = get(&gw.url("/"));
    assert_eq!(
        r.status,
        502,
        "both servers fail on the first request: {}",
        r.text()
    );
    let r = get(&gw.url("/"));
    assert_eq!(r.status, 503, "{}", r.text());
    let j = r.json();
    assert_eq!(j["status"], 503);
    assert_eq!(
        j["request_id"].as_str(),
        r.header("x-request-id").as_deref()
    );
}

// ---------------------------------------------------------------- balancing (§5)

fn upstream_block(name: &str, servers: &[(&TestUpstream, &str)]) -> String {
    let mut s = format!("upstream {name} {{\n");
    for (u, params) in servers {
        s.push_str(&format!("    server {} {params};\n", u.addr()));
    }
    s.push_str("}\n");
    s
}

fn proxied(upstreams: &str, location: &str) -> Gateway {
    Gateway::start(&format!(
        "{upstreams}server {{\n    listen @PORT@;\n    location / {{ {location} }}\n}}\n"
    ))
}

#[test]
fn weighted_round_robin_across_three_servers() {
    let ups = [
        TestUpstream::start("a"),
        TestUpstream::start("b"),
        TestUpstream::start("c"),
    ];
    let gw = proxied(
        &upstream_block(
            "pool",
            &[(&ups[0], "weight=2"), (&ups[1], ""), (&ups[2], "weight=1")],
        ),
        "proxy_pass http://pool;",
    );
    let c = Client::new();
    let mut seen = std::collections::HashMap::new();
    for _ in 0..400 {
        let r = c.get(&gw.url("/"));
        assert_eq!(r.status, 200);
        *seen
            .entry(r.json()["id"].as_str().expect("id").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        (ups[0].count(), ups[1].count(), ups[2].count()),
        (200, 100, 100),
        "{seen:?}"
    );
}

#[test]
fn backup_gets_traffic_only_when_primaries_are_down() {
    let mut a = TestUpstream::start("a");
    let b = TestUpstream::start("b");
    let bk = TestUpstream::start("backup");
    let gw = proxied(
        &upstream_block(
            "pool",
            &[
                (&a, "max_fails=1 fail_timeout=30s"),
                (&b, "max_fails=1 fail_timeout=30s"),
                (&bk, "backup"),
            ],
        ),
        "proxy_pass http://pool;",
    );
    let c = Client::new();
    for _ in 0..20 {
        assert_eq!(c.get(&gw.url("/")).status, 200);
    }
    assert_eq!(bk.count(), 0);
    assert_eq!(a.count() + b.count(), 20);
    a.stop();
    for _ in 0..10 {
        let r = c.get(&gw.url("/"));
        assert_eq!(r.status, 200);
        assert_ne!(r.json()["id"], "a");
    }
    assert_eq!(bk.count(), 0, "one primary is still up");
    drop(b);
    for _ in 0..10 {
        let r = c.get(&gw.url("/"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["id"], "backup");
    }
}

#[test]
fn killing_a_server_under_sequential_load_loses_no_request() {
    let ups = vec![
        TestUpstream::start("a"),
        TestUpstream::start("b"),
        TestUpstream::start("c"),
    ];
    let gw = proxied(
        &upstream_block("pool", &[(&ups[0], ""), (&ups[1], ""), (&ups[2], "")]),
        "proxy_pass http://pool;",
    );
    let mut ups = ups;
    let c = Client::new();
    let mut failures = Vec::new();
    for i in 0..300 {
        if i == 100 {
            ups[1].stop();
        }
        match c.try_request("GET", &gw.url(&format!("/req/{i}")), &[], "") {
            Ok(r) if r.status == 200 => {}
            Ok(r) => failures.push(format!("{i}: {} {}", r.status, r.text())),
            Err(e) => failures.push(format!("{i}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    let after_kill = ups[1]
        .requests()
        .iter()
        .filter(|r| {
            r.target
                .trim_start_matches("/req/")
                .parse::<u32>()
                .is_ok_and(|n| n >= 100)
        })
        .count();
    assert_eq!(after_kill, 0);
    assert!(ups[0].count() > 100 && ups[2].count() > 100);
}

#[test]
fn post_is_not_retried_after_it_was_sent_but_get_is() {
    let closer1 = TestUpstream::with("c1", |_| Reply::close());
    let closer2 = TestUpstream::with("c2", |_| Reply::close());
    let gw = proxied(
        &upstream_block(
            "pool",
            &[(&closer1, "max_fails=0"), (&closer2, "max_fails=0")],
        ),
        "proxy_pass http://pool;",
    );
    let r = request(
        "POST",
        &gw.url("/orders"),
        &[("content-type", "application/json")],
        r#"{"n":1}"#,
    );
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(closer1.count() + closer2.count(), 1, "the POST was retried");
    // A POST without a body is still not idempotent.
    let r = request("POST", &gw.url("/orders"), &[], "");
    assert_eq!(r.status, 502);
    assert_eq!(
        closer1.count() + closer2.count(),
        2,
        "the empty POST was retried"
    );
    let r = get(&gw.url("/orders"));
    assert_eq!(r.status, 502);
    assert_eq!(
        closer1.count() + closer2.count(),
        4,
        "the GET should go to both servers"
    );
}

#[test]
fn get_is_retried_on_the_next_server() {
    let closer = TestUpstream::with("closer", |_| Reply::close());
    let good = TestUpstream::start("good");
    let gw = proxied(
        &upstream_block("pool", &[(&closer, "max_fails=0"), (&good, "max_fails=0")]),
        "proxy_pass http://pool;",
    );
    let c = Client::new();
    for _ in 0..6 {
        let r = c.get(&gw.url("/"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["id"], "good");
    }
    assert!(closer.count() >= 2, "the closer got {}", closer.count());
    assert_eq!(good.count(), 6);
}

#[test]
fn next_upstream_http_503_and_tries() {
    let busy = TestUpstream::with("busy", |_| Reply::status(503));
    let good = TestUpstream::start("good");
    let servers = upstream_block("pool", &[(&busy, "max_fails=0"), (&good, "max_fails=0")]);
    let gw = Gateway::start(&format!(
        "{servers}server {{
    listen @PORT@;
    location /retry/ {{ proxy_next_upstream error timeout http_503; proxy_pass http://pool; }}
    location /once/ {{ proxy_next_upstream error timeout http_503; proxy_next_upstream_tries 1; proxy_pass http://pool; }}
    location /plain/ {{ proxy_pass http://pool; }}
}}"
    ));
    let c = Client::new();
    for _ in 0..6 {
        let r = c.get(&gw.url("/retry/"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(busy.count() >= 2);
    let (b0, g0) = (busy.count(), good.count());
    let statuses: Vec<u16> = (0..6).map(|_| c.get(&gw.url("/once/")).status).collect();
    assert!(statuses.contains(&503), "{statuses:?}");
    assert_eq!(
        busy.count() + good.count() - b0 - g0,
        6,
        "tries 1 must not retry"
    );
    let (b0, g0) = (busy.count(), good.count());
    let statuses: Vec<u16> = (0..6).map(|_| c.get(&gw.url("/plain/")).status).collect();
    assert!(
        statuses.contains(&503),
        "a 503 is passed through by default: {statuses:?}"
    );
    assert_eq!(busy.count() + good.count() - b0 - g0, 6);
}

// ---------------------------------------------------------------- aggregation (§9, §13.11)

/// Two handlers that must be running at the same time: each waits (bounded)
/// for the other to arrive, and fails with 500 if it never does.
#[derive(Clone, Default)]
struct Rendezvous(Arc<(Mutex<usize>, Condvar)>);

impl Rendezvous {
    fn meet(&self) -> bool {
        let (m, cv) = &*self.0;
        let mut n = m.lock().expect("lock");
        *n += 1;
        cv.notify_all();
        let (n, _) = cv
            .wait_timeout_while(n, DEADLINE / 2, |n| *n < 2)
            .expect("lock");
        *n >= 2
    }
}

struct Services {
    orders: TestUpstream,
    users: TestUpstream,
    products: TestUpstream,
}

/// The seed's three services. Unless a canned reply is given, the user and
/// product calls must be in flight together to succeed.
fn services(users_reply: Option<Reply>, products_reply: Option<Reply>) -> Services {
    assert_eq!(
        users_reply.is_some(),
        products_reply.is_some(),
        "both canned or neither"
    );
    let meet = Rendezvous::default();
    let m2 = meet.clone();
    let orders = TestUpstream::with("orders", |r| {
        let id: u64 = r.target.trim_start_matches("/orders/").parse().unwrap_or(0);
        Reply::json(serde_json::json!({"id": id, "userId": 7, "productId": 3}))
    });
    let users = TestUpstream::with("users", move |r| {
        if let Some(reply) = &users_reply {
            return reply.clone();
        }
        if !meet.meet() {
            return Reply::status(500);
        }
        let id: u64 = r.target.trim_start_matches("/users/").parse().unwrap_or(0);
        Reply::json(serde_json::json!({"id": id, "name": "Ada"}))
    });
    let products = TestUpstream::with("products", move |r| {
        if let Some(reply) = &products_reply {
            return reply.clone();
        }
        if !m2.meet() {
            return Reply::status(500);
        }
        let id: u64 = r
            .target
            .trim_start_matches("/products/")
            .parse()
            .unwrap_or(0);
        Reply::json(serde_json::json!({"id": id, "price": 9.5}))
    });
    Services {
        orders,
        users,
        products,
    }
}

fn aggregate_gateway(s: &Services, options: &str) -> Gateway {
    Gateway::start(&format!(
        "upstream order_service {{ server {}; }}
upstream user_service {{ server {}; }}
upstream product_service {{ server {}; }}
server {{
    listen @PORT@;
    location ~ ^/api/order-details/(?<id>[0-9]+)$ {{
        proxy_set_header X-From-Gateway yes;
        aggregate {{
            call order   http://order_service/orders/$id;
            call user    http://user_service/users/$order.userId;
            call product http://product_service/products/$order.productId;
            {options}
        }}
    }}
}}",
        s.orders.addr(),
        s.users.addr(),
        s.products.addr()
    ))
}

#[test]
fn aggregate_seed_scenario_runs_dependent_calls_in_parallel() {
    let s = services(None, None);
    let gw = aggregate_gateway(&s, "timeout 5s; on_error partial;");
    let r = request(
        "GET",
        &gw.url("/api/order-details/42"),
        &[("authorization", "Bearer t0k"), ("x-request-id", "agg-1")],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-aggregate-complete").as_deref(), Some("true"));
    let j = r.json();
    assert_eq!(j["order"]["id"], 42);
    assert_eq!(j["user"]["id"], 7);
    assert_eq!(j["user"]["name"], "Ada");
    assert_eq!(j["product"]["id"], 3);
    assert_eq!(s.orders.last().target, "/orders/42");
    assert_eq!(s.users.last().target, "/users/7");
    assert_eq!(s.products.last().target, "/products/3");
    for up in [&s.orders, &s.users, &s.products] {
        let got = up.last();
        assert_eq!(got.method, "GET");
        assert_eq!(got.header("authorization").as_deref(), Some("Bearer t0k"));
        assert_eq!(got.header("x-request-id").as_deref(), Some("agg-1"));
        assert_eq!(got.header("x-from-gateway").as_deref(), Some("yes"));
    }
}

#[test]
fn aggregate_partial_gives_null_for_a_failed_call() {
    let user = Reply::json(serde_json::json!({"id": 7}));
    let s = services(Some(user), Some(Reply::status(500)));
    let gw = aggregate_gateway(&s, "timeout 5s; on_error partial;");
    let r = get(&gw.url("/api/order-details/42"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-aggregate-complete").as_deref(), Some("false"));
    let j = r.json();
    assert_eq!(j["order"]["id"], 42);
    assert_eq!(j["user"]["id"], 7);
    assert!(j["product"].is_null());
    assert!(j.as_object().expect("object").contains_key("product"));
}

#[test]
fn aggregate_partial_null_for_non_json_body() {
    let s = services(
        Some(Reply::text("not json")),
        Some(Reply::json(serde_json::json!({"id": 3}))),
    );
    let gw = aggregate_gateway(&s, "timeout 5s; on_error partial;");
    let r = get(&gw.url("/api/order-details/1"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-aggregate-complete").as_deref(), Some("false"));
    assert!(r.json()["user"].is_null());
    assert_eq!(r.json()["product"]["id"], 3);
}

#[test]
fn aggregate_fail_mode_is_502() {
    let s = services(
        Some(Reply::json(serde_json::json!({"id": 7}))),
        Some(Reply::status(500)),
    );
    let gw = aggregate_gateway(&s, "timeout 5s; on_error fail;");
    let r = get(&gw.url("/api/order-details/42"));
    assert_eq!(r.status, 502, "{}", r.text());
    let j = r.json();
    assert_eq!(j["status"], 502);
    assert_eq!(
        j["request_id"].as_str(),
        r.header("x-request-id").as_deref()
    );
}

#[test]
fn aggregate_timeout_partial_and_fail() {
    let slow = || Some(Reply::json(serde_json::json!({"id": 3})).delay(Duration::from_secs(3)));
    let s = services(Some(Reply::json(serde_json::json!({"id": 7}))), slow());
    let gw = aggregate_gateway(&s, "timeout 300ms; on_error partial;");
    let r = get(&gw.url("/api/order-details/42"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-aggregate-complete").as_deref(), Some("false"));
    let j = r.json();
    assert_eq!(j["order"]["id"], 42);
    assert!(j["product"].is_null());
    drop(gw);
    let s = services(Some(Reply::json(serde_json::json!({"id": 7}))), slow());
    let gw = aggregate_gateway(&s, "timeout 300ms; on_error fail;");
    let r = get(&gw.url("/api/order-details/42"));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["status"], 504);
}

// ---------------------------------------------------------------- protocols

#[test]
fn head_and_other_methods_pass_through() {
    let up = TestUpstream::start("up");
    let gw = gateway(&up, "location / { proxy_pass http://UP; }");
    let r = request("HEAD", &gw.url("/h"), &[], "");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(up.last().method, "HEAD");
    for m in ["PUT", "PATCH", "DELETE", "OPTIONS"] {
        let r = request(
            m,
            &gw.url("/m"),
            &[("content-type", "text/plain")],
            "payload",
        );
        assert_eq!(r.status, 200, "{m}");
        let got = up.last();
        assert_eq!(
            (got.method.as_str(), got.body.as_slice()),
            (m, b"payload".as_slice())
        );
    }
}

#[test]
fn http2_prior_knowledge_is_served() {
    let up = TestUpstream::start("up");
    let gw = gateway(&up, "location /api/ { proxy_pass http://UP/v1/; }");
    let r = Client::h2().get(&gw.url("/api/x?q=1"));
    assert_eq!(r.status, 200, "{}", r.text());
    let got = up.last();
    assert_eq!(got.target, "/v1/x?q=1");
    assert_eq!(got.header("x-forwarded-host"), Some(gw.addr()));
    assert!(r.header("x-request-id").is_some());
}

#[test]
fn http2_prior_knowledge_posts_a_body() {
    let up = TestUpstream::start("up");
    let gw = gateway(&up, "location / { proxy_pass http://UP; }");
    let r = Client::h2().request("POST", &gw.url("/p"), &[], vec![b'z'; 100_000]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.last().body.len(), 100_000);
    // HTTP/2 has no Host header: the authority is used.
    assert_eq!(up.last().header("x-forwarded-host"), Some(gw.addr()));
}

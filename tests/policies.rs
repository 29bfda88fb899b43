//! LANGUAGE.md §6 and §7 end to end: JWT authentication and rate limiting
//! in front of a real upstream, through the real binary. Tokens are minted
//! here; the Redis tests start a real `redis-server` on a free port.

mod util;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use util::*;

const SECRET: &str = "test-secret-test-secret-test-secret-00";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// An HS256 token over `claims` signed with `secret`.
fn hs256(claims: serde_json::Value, secret: &str) -> String {
    let head = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = b64(claims.to_string().as_bytes());
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = aws_lc_rs::hmac::sign(&key, format!("{head}.{body}").as_bytes());
    format!("{head}.{body}.{}", b64(sig.as_ref()))
}

fn good_token(sub: &str) -> String {
    hs256(
        serde_json::json!({"sub": sub, "exp": now() + 600, "iss": "https://auth.example.com/", "aud": "orders-api", "role": "admin"}),
        SECRET,
    )
}

fn jwt_gateway(up: &TestUpstream) -> Gateway {
    Gateway::start(&format!(
        r#"
auth_jwt users_api {{
    algorithms HS256;
    secret "{SECRET}";
    issuer https://auth.example.com/;
    audience orders-api;
    leeway 5s;
    forward_claim sub X-User-Id;
}}
access_log off;
server {{
    listen @PORT@;
    location /api/ {{
        auth_jwt users_api;
        proxy_set_header X-Role $jwt_claim_role;
        proxy_pass http://{up};
    }}
    location /api/public/ {{
        auth_jwt off;
        proxy_pass http://{up};
    }}
    location /cookie/ {{
        auth_jwt cookie_api;
        proxy_pass http://{up};
    }}
}}
auth_jwt cookie_api {{
    algorithms HS256;
    secret "{SECRET}";
    token_from cookie session;
}}
"#,
        up = up.addr()
    ))
}

#[test]
fn missing_token_is_401_no_token_provided() {
    let up = TestUpstream::start("up");
    let gw = jwt_gateway(&up);
    let r = get(&gw.url("/api/orders"));
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "No token provided");
    assert!(
        r.json()["request_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some(r#"Bearer realm="users_api""#)
    );
    assert_eq!(up.count(), 0);
}

#[test]
fn valid_token_passes_with_claims_forwarded_and_forgeries_removed() {
    let up = TestUpstream::start("up");
    let gw = jwt_gateway(&up);
    let token = good_token("user-42");
    let r = request(
        "GET",
        &gw.url("/api/orders"),
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-user-id", "forged"),
        ],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = up.last();
    assert_eq!(seen.header("x-user-id").as_deref(), Some("user-42"));
    assert_eq!(seen.header("x-role").as_deref(), Some("admin"));
    assert_eq!(
        up.last()
            .headers
            .iter()
            .filter(|(n, _)| n.as_str() == "x-user-id")
            .count(),
        1,
        "the forged header must be gone, not duplicated"
    );
}

#[test]
fn every_invalid_token_is_401_invalid_token_never_echoing_why() {
    let up = TestUpstream::start("up");
    let gw = jwt_gateway(&up);
    let exp = now() + 600;
    let base = serde_json::json!({"sub": "u", "exp": exp, "iss": "https://auth.example.com/", "aud": "orders-api"});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let none_alg = format!(
        "{}.{}.",
        b64(br#"{"alg":"none"}"#),
        b64(base.to_string().as_bytes())
    );
    let hs512 = {
        let head = b64(br#"{"alg":"HS512"}"#);
        let body = b64(base.to_string().as_bytes());
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA512, SECRET.as_bytes());
        let sig = aws_lc_rs::hmac::sign(&key, format!("{head}.{body}").as_bytes());
        format!("{head}.{body}.{}", b64(sig.as_ref()))
    };
    let crit = {
        let head = b64(br#"{"alg":"HS256","crit":["exp2"],"exp2":1}"#);
        let body = b64(base.to_string().as_bytes());
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET.as_bytes());
        let sig = aws_lc_rs::hmac::sign(&key, format!("{head}.{body}").as_bytes());
        format!("{head}.{body}.{}", b64(sig.as_ref()))
    };
    let mut no_exp = base.clone();
    no_exp.as_object_mut().expect("object").remove("exp");
    let mut no_iss = base.clone();
    no_iss.as_object_mut().expect("object").remove("iss");
    let cases: Vec<(&str, String)> = vec![
        ("garbage", "not.a.token".into()),
        (
            "bad signature",
            hs256(base.clone(), "another-secret-another-secret-0000"),
        ),
        ("alg none", none_alg),
        ("alg not configured", hs512),
        (
            "expired",
            hs256(with("exp", serde_json::json!(now() - 60)), SECRET),
        ),
        (
            "nbf in the future",
            hs256(with("nbf", serde_json::json!(now() + 600)), SECRET),
        ),
        (
            "wrong issuer",
            hs256(with("iss", serde_json::json!("https://evil/")), SECRET),
        ),
        (
            "wrong audience",
            hs256(with("aud", serde_json::json!("other")), SECRET),
        ),
        (
            "exp not a number",
            hs256(with("exp", serde_json::json!("tomorrow")), SECRET),
        ),
        ("no exp", hs256(no_exp, SECRET)),
        ("no iss while configured", hs256(no_iss, SECRET)),
        ("unknown crit", crit),
        ("oversized", format!("{}.{}.x", "a".repeat(9000), "b")),
    ];
    for (what, token) in cases {
        let r = request(
            "GET",
            &gw.url("/api/x"),
            &[("authorization", &format!("Bearer {token}"))],
            "",
        );
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_eq!(r.json()["error"], "Invalid token", "{what}");
        assert_eq!(
            r.header("www-authenticate").as_deref(),
            Some(r#"Bearer realm="users_api", error="invalid_token""#),
            "{what}"
        );
    }
    // Expired but within leeway passes.
    let r = request(
        "GET",
        &gw.url("/api/x"),
        &[(
            "authorization",
            &format!(
                "Bearer {}",
                hs256(with("exp", serde_json::json!(now() - 2)), SECRET)
            ),
        )],
        "",
    );
    assert_eq!(r.status, 200, "within leeway: {}", r.text());
    assert_eq!(up.count(), 1);
}

#[test]
fn auth_off_and_cookie_tokens() {
    let up = TestUpstream::start("up");
    let gw = jwt_gateway(&up);
    assert_eq!(get(&gw.url("/api/public/x")).status, 200);
    let token = good_token("c");
    let r = request(
        "GET",
        &gw.url("/cookie/x"),
        &[("cookie", &format!("a=b; session={token}"))],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(&gw.url("/cookie/x")).status, 401);
}

fn rl_gateway(up: &TestUpstream, extra: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
rate_limit ten {{ key $http_x_client; rate 10r/s; burst 5; }}
access_log off;
server {{
    listen @PORT@;
    location / {{
        rate_limit ten;
        proxy_pass http://{up};
    }}
{extra}
}}
"#,
        up = up.addr()
    ))
}

#[test]
fn gcra_admits_the_burst_then_one_per_interval_with_headers() {
    let up = TestUpstream::start("up");
    let gw = rl_gateway(&up, "");
    let c = Client::new();
    let start = Instant::now();
    let mut admitted = 0;
    let mut last_limited = None;
    for _ in 0..30 {
        let r = c.request("GET", &gw.url("/x"), &[("x-client", "a")], "");
        match r.status {
            200 => {
                admitted += 1;
                assert_eq!(r.header("ratelimit-limit").as_deref(), Some("6"));
                assert!(r.header("ratelimit-remaining").is_some());
                assert!(r.header("ratelimit-reset").is_some());
            }
            429 => last_limited = Some(r),
            s => panic!("unexpected {s}"),
        }
    }
    // 30 requests in well under 100 ms admit exactly burst + 1; if the
    // machine was slow, one more interval may have passed per 100 ms.
    let elapsed = start.elapsed().as_millis() as usize;
    assert!(
        (6..=6 + elapsed / 100).contains(&admitted),
        "admitted {admitted} in {elapsed} ms"
    );
    let r = last_limited.expect("some requests were limited");
    assert_eq!(r.json()["error"], "Too many requests");
    assert_eq!(r.json()["status"], 429);
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    assert_eq!(r.header("ratelimit-remaining").as_deref(), Some("0"));
    // Another key has its own bucket; an empty key is one shared bucket,
    // limited like any other (never exempt).
    assert_eq!(
        c.request("GET", &gw.url("/x"), &[("x-client", "b")], "")
            .status,
        200
    );
    let empty: Vec<u16> = (0..10).map(|_| c.get(&gw.url("/x")).status).collect();
    assert!(
        empty.contains(&429),
        "requests without the key header are limited together: {empty:?}"
    );
}

#[test]
fn counters_survive_a_reload_when_the_block_is_unchanged() {
    let up = TestUpstream::start("up");
    // A slow rate, so that the time a reload takes refills nothing.
    let conf = |limit: &str, extra: &str| {
        format!(
            "rate_limit slow {{ key $http_x_client; rate 1r/m; {limit} }}\naccess_log off;\n\
             server {{ listen @PORT@; {extra} location / {{ rate_limit slow; proxy_pass http://{}; }} }}\n",
            up.addr()
        )
    };
    let gw = Gateway::start(&conf("burst 2;", ""));
    let c = Client::new();
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            c.request("GET", &gw.url("/x"), &[("x-client", "k")], "")
                .status
        })
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    // Unchanged block, other parts changed: still limited.
    let reload = gw.rewrite_config(&conf("burst 2;", "add_header X-New 1;"));
    assert!(matches!(reload, Reload::Applied(_)), "{reload:?}");
    let r = c.request("GET", &gw.url("/x"), &[("x-client", "k")], "");
    assert_eq!(r.status, 429, "an unchanged limit keeps its counters");
    assert_eq!(r.header("x-new"), None, "add_header is for 2xx/3xx");
    // A changed block starts fresh.
    let reload = gw.rewrite_config(&conf("burst 3;", ""));
    assert!(matches!(reload, Reload::Applied(_)), "{reload:?}");
    assert_eq!(
        c.request("GET", &gw.url("/x"), &[("x-client", "k")], "")
            .status,
        200
    );
}

// ---------------------------------------------------------------- Redis

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start() -> Option<Redis> {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // For `DEBUG SLEEP` (a slow Redis); off by default since 7.
                "--enable-debug-command",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "redis-server is required in CI: {e}"
                );
                eprintln!("SKIPPED: redis-server not installed ({e}); the Redis tests did not run");
                return None;
            }
        };
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Redis { child, port })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_gateway(up: &TestUpstream, redis_port: u16, on_error: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
rate_limit shared {{ key $http_x_client; rate 1r/m; burst 9; store redis://127.0.0.1:{redis_port}/0; on_store_error {on_error}; }}
access_log off;
server {{ listen @PORT@; location / {{ rate_limit shared; proxy_pass http://{up}; }} }}
"#,
        up = up.addr()
    ))
}

#[test]
fn two_instances_sharing_redis_admit_what_one_would() {
    let Some(redis) = Redis::start() else { return };
    let up = TestUpstream::start("up");
    let a = redis_gateway(&up, redis.port, "allow");
    let b = redis_gateway(&up, redis.port, "allow");
    let c = Client::new();
    let mut admitted = 0;
    for i in 0..40 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if c.request("GET", &gw.url("/x"), &[("x-client", "shared-key")], "")
            .status
            == 200
        {
            admitted += 1;
        }
    }
    // burst 9 → 10 at once, 1 per minute after: together exactly 10.
    assert_eq!(admitted, 10);
}

#[test]
fn redis_down_follows_on_store_error() {
    let Some(redis) = Redis::start() else { return };
    let up = TestUpstream::start("up");
    let allow = redis_gateway(&up, redis.port, "allow");
    let deny = redis_gateway(&up, redis.port, "deny");
    drop(redis);
    let c = Client::new();
    let t = Instant::now();
    let r = c.request("GET", &allow.url("/x"), &[("x-client", "z")], "");
    assert_eq!(
        r.status, 200,
        "allow lets requests through while Redis is down"
    );
    let r = c.request("GET", &deny.url("/x"), &[("x-client", "z")], "");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "Rate limit store unavailable");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "decisions stay within the Redis timeout"
    );
}

/// Block a Redis server for `secs` seconds (`DEBUG SLEEP`), from a thread.
fn redis_sleep(port: u16, secs: u32) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("redis");
    let arg = secs.to_string();
    let cmd = format!(
        "*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n${}\r\n{arg}\r\n",
        arg.len()
    );
    s.write_all(cmd.as_bytes()).expect("send DEBUG SLEEP");
    std::thread::spawn(move || {
        let mut b = [0u8; 16];
        let _ = s.read(&mut b);
    })
}

#[test]
fn a_slow_redis_follows_on_store_error_within_its_timeout() {
    let Some(redis) = Redis::start() else { return };
    let up = TestUpstream::start("up");
    let allow = redis_gateway(&up, redis.port, "allow");
    let deny = redis_gateway(&up, redis.port, "deny");
    let c = Client::new();
    // Warm both connections to Redis while it answers.
    assert_eq!(
        c.request("GET", &allow.url("/x"), &[("x-client", "w1")], "")
            .status,
        200
    );
    assert_eq!(
        c.request("GET", &deny.url("/x"), &[("x-client", "w2")], "")
            .status,
        200
    );
    // Redis stops answering for 3 s: decisions time out, requests flow.
    let sleeper = redis_sleep(redis.port, 3);
    let t = Instant::now();
    let a = c.request("GET", &allow.url("/x"), &[("x-client", "slow")], "");
    let d = c.request("GET", &deny.url("/x"), &[("x-client", "slow")], "");
    let took = t.elapsed();
    assert_eq!(a.status, 200, "allow: {}", a.text());
    assert_eq!(d.status, 503, "deny: {}", d.text());
    assert_eq!(d.json()["error"], "Rate limit store unavailable");
    assert!(
        took < Duration::from_millis(2500),
        "two decisions took {took:?}, not bounded by the Redis timeout"
    );
    sleeper.join().expect("sleeper");
}

#[test]
fn several_limits_on_a_route_send_the_most_restrictive_headers() {
    let up = TestUpstream::start("up");
    let gw = Gateway::start(&format!(
        r#"
rate_limit loose {{ key $http_x_client; rate 1r/m; burst 50; }}
rate_limit tight {{ key $http_x_client; rate 1r/m; burst 2; }}
access_log off;
server {{
    listen @PORT@;
    location / {{
        rate_limit loose;
        rate_limit tight;
        proxy_pass http://{up};
    }}
}}
"#,
        up = up.addr()
    ));
    let c = Client::new();
    let send = || c.request("GET", &gw.url("/x"), &[("x-client", "a")], "");
    // The tight limit has the fewest remaining: its figures are sent.
    for left in ["2", "1", "0"] {
        let r = send();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("ratelimit-limit").as_deref(), Some("3"));
        assert_eq!(r.header("ratelimit-remaining").as_deref(), Some(left));
    }
    // Its refusal is the answer, with its headers.
    let r = send();
    assert_eq!(r.status, 429);
    assert_eq!(r.header("ratelimit-limit").as_deref(), Some("3"));
    assert_eq!(r.header("ratelimit-remaining").as_deref(), Some("0"));
    assert!(r.header("retry-after").is_some());
    assert_eq!(up.count(), 3);
}

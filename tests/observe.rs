//! LANGUAGE.md §10 end to end: the access log (JSON keys of §13.14, the
//! combined format, `access_log off`), Prometheus metrics on the admin
//! listener, and W3C trace context propagation.

mod util;

use std::time::{Duration, Instant};

use util::*;

fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < end,
            "only {} of {n} log lines: {text}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn access_log_json_lines_have_every_key() {
    let up = TestUpstream::start("up");
    let gw = Gateway::start(&format!(
        "access_log access.log json;\nserver {{ listen @PORT@; location /api/ {{ proxy_pass http://{}; }} location /quiet/ {{ access_log off; return 204; }} }}\n",
        up.addr()
    ));
    let r = request(
        "GET",
        &gw.url("/api/x?a=1"),
        &[
            ("x-request-id", "log-1"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ],
        "",
    );
    assert_eq!(r.status, 200);
    assert_eq!(get(&gw.url("/quiet/x")).status, 204);
    assert_eq!(get(&gw.url("/nothing-here")).status, 404);
    let lines = wait_lines(&gw.dir().join("access.log"), 2);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).expect("json line");
    for key in [
        "time",
        "request_id",
        "remote_addr",
        "method",
        "path",
        "query",
        "status",
        "bytes_sent",
        "duration_ms",
        "upstream_addr",
        "upstream_status",
        "upstream_duration_ms",
        "route",
        "server",
        "trace_id",
        "policies",
    ] {
        assert!(first.get(key).is_some(), "missing `{key}` in {first}");
    }
    assert_eq!(first["request_id"], "log-1");
    assert_eq!(first["path"], "/api/x");
    assert_eq!(first["query"], "a=1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "/api/");
    assert_eq!(first["upstream_addr"], up.addr());
    assert_eq!(first["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(first["bytes_sent"].as_u64().is_some_and(|b| b > 0));
    let second: serde_json::Value = serde_json::from_str(&lines[1]).expect("json line");
    assert_eq!(
        second["route"], "none",
        "the quiet location logs nothing; the 404 is next"
    );
    assert_eq!(second["status"], 404);
    // The trace continues upstream with the gateway's own span.
    let tp = up.requests()[0]
        .header("traceparent")
        .expect("traceparent upstream");
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(
        !tp.contains("00f067aa0ba902b7"),
        "the gateway's span id replaces the caller's: {tp}"
    );
}

#[test]
fn a_log_turned_on_in_one_location_has_its_path() {
    // Off everywhere else: the gateway keeps a request's URI only where some
    // log may write it, and this location's may.
    let up = TestUpstream::start("up");
    let gw = Gateway::start(&format!(
        "access_log off;\nserver {{ listen @PORT@; location /quiet/ {{ proxy_pass http://{0}; }} location /loud/ {{ access_log access.log json; proxy_pass http://{0}; }} }}\n",
        up.addr()
    ));
    assert_eq!(get(&gw.url("/quiet/a")).status, 200);
    assert_eq!(get(&gw.url("/loud/b?c=d")).status, 200);
    let lines = wait_lines(&gw.dir().join("access.log"), 1);
    let line: serde_json::Value = serde_json::from_str(&lines[0]).expect("json line");
    assert_eq!(line["path"], "/loud/b");
    assert_eq!(line["query"], "c=d");
    assert_eq!(line["route"], "/loud/");
}

#[test]
fn combined_format_and_a_new_trace_when_none_came() {
    let up = TestUpstream::start("up");
    let gw = Gateway::start(&format!(
        "server {{ listen @PORT@; access_log access.log combined; location / {{ proxy_pass http://{}; }} }}\n",
        up.addr()
    ));
    request(
        "GET",
        &gw.url("/p?q=1"),
        &[("user-agent", "test-agent/1"), ("referer", "http://r/")],
        "",
    );
    let lines = wait_lines(&gw.dir().join("access.log"), 1);
    let l = &lines[0];
    assert!(l.starts_with("127.0.0.1 - - ["), "{l}");
    assert!(l.contains("\"GET /p?q=1 HTTP/1.1\" 200 "), "{l}");
    assert!(l.ends_with("\"http://r/\" \"test-agent/1\""), "{l}");
    let tp = up.last().header("traceparent").expect("a trace is started");
    assert_eq!(tp.len(), 55, "{tp}");
}

#[test]
fn metrics_on_the_admin_listener() {
    let up = TestUpstream::start("up");
    let admin = free_port();
    let gw = Gateway::start(&format!(
        "admin {{ listen 127.0.0.1:{admin}; }}\naccess_log off;\n\
         upstream pool {{ server {}; }}\n\
         rate_limit tiny {{ rate 1r/m; }}\n\
         server {{ listen @PORT@; location = /health {{ return 200; }} location /api/ {{ proxy_pass http://pool; }} location /limited {{ rate_limit tiny; return 200; }} }}\n",
        up.addr()
    ));
    let c = Client::new();
    c.get(&gw.url("/health"));
    c.get(&gw.url("/api/x"));
    c.get(&gw.url("/limited"));
    c.get(&gw.url("/limited"));
    // Clients choose extension methods freely: they share one series.
    for m in ["FOO", "BAR"] {
        let reply = raw(
            &gw.addr(),
            format!("{m} /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(raw_status(&reply), 200);
    }
    let r = c.get(&format!("http://127.0.0.1:{admin}/metrics"));
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.contains("openmetrics") || t.contains("text/plain"))
    );
    let m = r.text();
    assert!(!m.contains("method=\"FOO\""), "{m}");
    for needle in [
        r#"gateway_requests_total{route="= /health",method="GET",status="200"} 1"#,
        r#"gateway_requests_total{route="/api/",method="GET",status="200"} 1"#,
        r#"gateway_requests_total{route="= /health",method="OTHER",status="200"} 2"#,
        "gateway_request_duration_seconds_bucket",
        r#"gateway_upstream_requests_total{upstream="pool""#,
        r#"gateway_upstream_up{upstream="pool""#,
        r#"gateway_upstream_active_requests{upstream="pool""#,
        r#"gateway_rate_limited_total{limit="tiny"} 1"#,
        "gateway_connections_active",
        "gateway_config_generation 1",
    ] {
        assert!(m.contains(needle), "missing {needle} in:\n{m}");
    }
    assert_eq!(
        c.get(&format!("http://127.0.0.1:{admin}/healthz")).status,
        200
    );
    assert_eq!(
        c.get(&format!("http://127.0.0.1:{admin}/readyz")).status,
        200
    );
    let cfg = c.get(&format!("http://127.0.0.1:{admin}/config")).json();
    assert_eq!(cfg["generation"], 1);
    assert!(cfg["routes"].as_array().is_some_and(|r| r.len() == 3));
    let reload = gw.reload();
    assert!(matches!(reload, Reload::Applied(2)));
    let m = c.get(&format!("http://127.0.0.1:{admin}/metrics")).text();
    assert!(
        m.contains(r#"gateway_config_reloads_total{result="applied"} 1"#),
        "{m}"
    );
}

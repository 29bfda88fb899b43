//! Cargo feature `otlp` end to end: the real binary, pointed at a tiny
//! collector on `127.0.0.1:0` through `OTEL_EXPORTER_OTLP_ENDPOINT`,
//! exports one server span per request with the request's trace id, the
//! gateway's span id (the one sent upstream) and the caller's span as
//! parent. Run with `cargo test --features otlp --test otlp`.

#![cfg(feature = "otlp")]

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use serde_json::Value;
use util::*;

/// One POST the collector received.
struct Export {
    path: String,
    content_type: String,
    body: Vec<u8>,
}

/// A collector that answers every request `200 {}` and hands it to the test.
fn collector() -> (String, Receiver<Export>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind collector");
    let addr = l.local_addr().expect("addr").to_string();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || serve_one(s, tx));
        }
    });
    (addr, rx)
}

fn serve_one(s: TcpStream, tx: Sender<Export>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut len, mut content_type) = (0usize, String::new());
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "content-type" => content_type = v.trim().to_string(),
                _ => {}
            }
        }
    }
    let mut body = vec![0; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let _ = w.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
    );
    let _ = tx.send(Export {
        path,
        content_type,
        body,
    });
}

/// `tollgate run` with the OTLP environment, killed on drop.
struct Gw(Child);

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_gateway(config: &str, collector: &str) -> (Gw, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("gateway.conf");
    std::fs::write(&conf, config).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["run".as_ref(), "-c".as_ref(), conf.as_os_str()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{collector}/"),
        )
        .env("OTEL_SERVICE_NAME", "edge-test")
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    let stderr = child.stderr.take().expect("stderr");
    let gw = Gw(child);
    // Wait (bounded) for the "serving" line; keep draining stderr after.
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let end = Instant::now() + DEADLINE;
    let mut seen = String::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(" serving ") => break,
            Ok(l) => {
                seen.push_str(&l);
                seen.push('\n');
            }
            Err(_) => panic!("gateway did not start:\n{seen}"),
        }
    }
    std::thread::spawn(move || for _ in rx {});
    (gw, dir)
}

/// Spans received so far, until every trace id in `want` has one (bounded).
fn spans_until(rx: &Receiver<Export>, want: &[&str]) -> Vec<Value> {
    let end = Instant::now() + Duration::from_secs(20);
    let mut spans = Vec::new();
    loop {
        let have = |t: &str| spans.iter().any(|s: &Value| s["traceId"] == t);
        if want.iter().all(|t| have(t)) {
            return spans;
        }
        let left = end.saturating_duration_since(Instant::now());
        let e = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no span for every trace of {want:?}; got {spans:?}"));
        assert_eq!(e.path, "/v1/traces");
        assert_eq!(e.content_type, "application/json");
        let v: Value = serde_json::from_slice(&e.body).expect("OTLP JSON");
        for rs in v["resourceSpans"].as_array().expect("resourceSpans") {
            assert_eq!(
                rs["resource"]["attributes"][0],
                serde_json::json!({"key": "service.name", "value": {"stringValue": "edge-test"}})
            );
            for ss in rs["scopeSpans"].as_array().expect("scopeSpans") {
                spans.extend(ss["spans"].as_array().expect("spans").iter().cloned());
            }
        }
    }
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .expect("attributes")
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
        .unwrap_or_else(|| panic!("no `{key}` in {span}"))
}

#[test]
fn exports_one_server_span_per_request() {
    let (collector_addr, exports) = collector();
    let up = TestUpstream::start("up");
    let port = free_port();
    let (_gw, _dir) = start_gateway(
        &format!(
            "server {{ listen 127.0.0.1:{port}; location /api/ {{ proxy_pass http://{}; }} location /fail/ {{ return 503; }} }}\n",
            up.addr()
        ),
        &collector_addr,
    );
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");

    // Not sampled by the caller: no span (checked below, through FIFO order).
    let unsampled = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-00f067aa0ba902b7-00";
    assert_eq!(
        request("GET", &url("/api/u"), &[("traceparent", unsampled)], "").status,
        200
    );

    // A caller's trace: continued, with the caller's span as parent.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = request("GET", &url("/api/x?a=1"), &[("traceparent", caller)], "");
    assert_eq!(r.status, 200);
    let sent_up = up
        .last()
        .header("traceparent")
        .expect("traceparent upstream");
    let ours = sent_up.split('-').nth(2).expect("span id").to_string();

    // No traceparent: a new trace, no parent.
    assert_eq!(get(&url("/api/new")).status, 200);
    let new_tp = up
        .last()
        .header("traceparent")
        .expect("traceparent upstream");
    let new_trace = new_tp.split('-').nth(1).expect("trace id").to_string();

    // A 5xx: span status error.
    let failing = "00-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-1111111111111111-01";
    assert_eq!(
        request("POST", &url("/fail/y"), &[("traceparent", failing)], "").status,
        503
    );

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let fail_trace = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let spans = spans_until(&exports, &[trace, &new_trace, fail_trace]);
    // Spans leave in the order requests ended: had the unsampled request
    // been exported, it would be here already.
    assert!(
        !spans
            .iter()
            .any(|s| s["traceId"] == "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
        "unsampled trace exported: {spans:?}"
    );
    let find = |t: &str| {
        let v: Vec<&Value> = spans.iter().filter(|s| s["traceId"] == t).collect();
        assert_eq!(v.len(), 1, "one span for {t}: {spans:?}");
        v[0].clone()
    };

    let s = find(trace);
    assert_eq!(s["spanId"], ours.as_str());
    assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(s["name"], "GET /api/");
    assert_eq!(s["kind"], 2);
    assert_eq!(attr(&s, "http.request.method")["stringValue"], "GET");
    assert_eq!(attr(&s, "http.route")["stringValue"], "/api/");
    assert_eq!(attr(&s, "http.response.status_code")["intValue"], "200");
    assert_eq!(attr(&s, "url.path")["stringValue"], "/api/x");
    assert_eq!(
        attr(&s, "server.address")["stringValue"],
        up.addr().as_str()
    );
    let nanos = |k: &str| s[k].as_str().and_then(|n| n.parse::<u128>().ok()).expect(k);
    assert!(nanos("startTimeUnixNano") > 0);
    assert!(nanos("endTimeUnixNano") >= nanos("startTimeUnixNano"));
    assert!(s.get("status").is_none(), "2xx is not an error: {s}");

    let s = find(&new_trace);
    assert!(
        s.get("parentSpanId").is_none(),
        "a new trace has no parent: {s}"
    );
    assert_eq!(s["spanId"], new_tp.split('-').nth(2).expect("span id"));

    let s = find(fail_trace);
    assert_eq!(s["name"], "POST /fail/");
    assert_eq!(s["parentSpanId"], "1111111111111111");
    assert_eq!(s["status"]["code"], 2);
    assert_eq!(attr(&s, "http.response.status_code")["intValue"], "503");
}

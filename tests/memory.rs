//! Memory given back after a burst (`src/server/memory.rs`): a burst of
//! requests in flight at once on the worker is followed by one trim, counted
//! on `/metrics`; sequential traffic never triggers one, nor does a burst
//! under `memory_trim off;`. Loading a config is followed by one too (what
//! parsing it freed).
//!
//! The bursts are exact, not timed: the upstream holds each request for
//! `/burst` until the whole batch has arrived, so they are all in flight in
//! the gateway at once, then answers them together.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

mod util;

/// More than the gateway's burst threshold (128 in flight on one worker).
const BURST: usize = 160;
const BOUND: Duration = Duration::from_secs(10);

/// An upstream that holds every request for `/burst` until a batch of
/// `hold` of them arrived (the first `hold`, then the next `hold`, ...);
/// other requests are answered at once. One thread per connection,
/// keep-alive.
fn holding_upstream(hold: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen = Arc::new((Mutex::new(0usize), Condvar::new()));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(BOUND * 2));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let held = buf.starts_with(b"GET /burst ");
                    buf.drain(..end);
                    if held {
                        let (m, cv) = &*seen;
                        let mut n = m.lock().unwrap_or_else(|e| e.into_inner());
                        *n += 1;
                        cv.notify_all();
                        // This request's batch is complete at the next
                        // multiple of `hold`.
                        let batch_end = n.div_ceil(hold) * hold;
                        let deadline = Instant::now() + BOUND;
                        while *n < batch_end && Instant::now() < deadline {
                            n = cv
                                .wait_timeout(n, deadline - Instant::now())
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn config(up: &str, trim: &str) -> String {
    format!(
        "worker_threads 1;\naccess_log off;\n{trim}admin {{ listen @PORT2@; }}\n\
         upstream up {{ server {up}; keepalive 256; }}\n\
         server {{ listen @PORT@; location / {{ proxy_pass http://up; }} }}\n"
    )
}

fn metrics(gw: &util::Gateway) -> String {
    util::get(&format!("http://{}/metrics", gw.addr_n(1))).text()
}

fn trims(gw: &util::Gateway) -> u64 {
    metrics(gw)
        .lines()
        .find_map(|l| l.strip_prefix("gateway_memory_trims_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("gateway_memory_trims_total on /metrics")
}

/// Wait (bounded) until `gateway_memory_trims_total` is at least `n`.
fn wait_trims(gw: &util::Gateway, n: u64) {
    let deadline = Instant::now() + BOUND;
    while trims(gw) < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} trims after {BOUND:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// BURST connections opened and their requests sent before the upstream
/// answers any (BURST requests in flight on the one worker), then every
/// response read.
fn burst(gw: &util::Gateway) {
    let mut conns: Vec<TcpStream> = (0..BURST)
        .map(|_| {
            let s = TcpStream::connect(gw.addr()).expect("connect");
            s.set_read_timeout(Some(BOUND)).expect("timeout");
            s
        })
        .collect();
    for s in &mut conns {
        s.write_all(b"GET /burst HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("send");
    }
    for s in &mut conns {
        let mut got = Vec::new();
        let mut chunk = [0u8; 512];
        while !got.ends_with(b"ok") {
            let n = s.read(&mut chunk).expect("response");
            assert!(n > 0, "connection closed before the response");
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    }
}

#[test]
fn a_burst_is_followed_by_one_trim_and_steady_traffic_by_none() {
    let up = holding_upstream(BURST);
    let gw = util::Gateway::start(&config(&up, ""));
    // The one after loading the config (on a thread of its own), and none
    // before any burst.
    wait_trims(&gw, 1);
    assert_eq!(trims(&gw), 1, "one trim after the config's load");
    burst(&gw);
    // The trim follows the end of the burst (after a short settle).
    wait_trims(&gw, 2);
    assert!(metrics(&gw).contains("gateway_memory_released_bytes_total"));

    // Sequential requests (one in flight at a time) are no burst: the count
    // stays where it was.
    let before = trims(&gw);
    for _ in 0..300 {
        assert_eq!(util::get(&gw.url("/x")).status, 200);
    }
    assert_eq!(trims(&gw), before, "steady traffic trimmed");
}

#[test]
fn loading_a_large_config_gives_back_what_parsing_it_freed() {
    // A config of 3,000 locations: its token queue and syntax tree are
    // freed once it is compiled, and given back at once, not kept at the
    // load's peak (10,000 locations: 50 MiB resident before, 24 after).
    let up = holding_upstream(BURST);
    let mut conf = config(&up, "");
    let locations: String = (0..3000)
        .map(|i| format!("location /r{i}/ {{ proxy_pass http://up/; }}\n"))
        .collect();
    conf = conf.replace("location / {", &format!("{locations}location / {{"));
    let gw = util::Gateway::start(&conf);
    wait_trims(&gw, 1);
    assert_eq!(trims(&gw), 1, "one trim after the config's load");
    let released: f64 = metrics(&gw)
        .lines()
        .find_map(|l| l.strip_prefix("gateway_memory_released_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("gateway_memory_released_bytes_total on /metrics");
    assert!(
        released > 2.0 * 1024.0 * 1024.0,
        "gave back only {released} bytes after loading 3,000 locations"
    );
    assert_eq!(util::get(&gw.url("/r2999/x")).status, 200);
}

#[test]
fn memory_trim_off_is_obeyed_and_a_reload_turns_it_on() {
    let up = holding_upstream(BURST);
    let gw = util::Gateway::start(&config(&up, "memory_trim off;\n"));
    burst(&gw);
    // A reload takes longer than the trim's settle after a burst: a trim
    // wrongly started by the burst above would show here, beside the one
    // after the reload's load (the new config has the trims on; the
    // startup's load, under `off`, had none).
    assert!(matches!(
        gw.rewrite_config(&config(&up, "memory_trim on;\n")),
        util::Reload::Applied(2)
    ));
    wait_trims(&gw, 1);
    assert_eq!(trims(&gw), 1, "trimmed under memory_trim off");
    burst(&gw);
    wait_trims(&gw, 2);
}

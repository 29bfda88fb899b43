//! LANGUAGE.md §11 end to end: reload on SIGHUP and on file change, bad
//! configs rejected, listeners added and removed, reload under load, and
//! graceful shutdown.

mod util;

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use util::*;

fn returns(body: &str) -> String {
    format!("server {{\n    listen @PORT@;\n    location = /v {{ return 200 \"{body}\"; }}\n}}\n")
}

fn body_at(gw: &Gateway, path: &str) -> String {
    let r = get(&gw.url(path));
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.text()
}

#[test]
fn sighup_reloads_the_config() {
    // conf.d holds no loaded file, so it is not watched: only SIGHUP can
    // pick up the new file there.
    let gw = Gateway::start_with_files(
        "server {\n    listen @PORT@;\n    location = /v { return 200 one; }\n    include conf.d/*.conf;\n}\n",
        &[("conf.d/README", "not a config")],
    );
    assert_eq!(get(&gw.url("/extra")).status, 404);
    std::fs::write(
        gw.dir().join("conf.d/extra.conf"),
        "location = /extra { return 200 extra; }\n",
    )
    .expect("write");
    assert_eq!(gw.reload(), Reload::Applied(2));
    assert!(
        gw.log()
            .contains("reload applied generation=2 trigger=\"SIGHUP\""),
        "{}",
        gw.log()
    );
    assert_eq!(body_at(&gw, "/extra"), "extra");
    assert_eq!(body_at(&gw, "/v"), "one");
    // A SIGHUP with nothing changed is a no-op reload.
    assert_eq!(gw.reload(), Reload::Applied(3));
    assert_eq!(body_at(&gw, "/extra"), "extra");
}

#[test]
fn file_change_reloads_the_config() {
    let gw = Gateway::start(&returns("one"));
    assert_eq!(body_at(&gw, "/v"), "one");
    assert_eq!(gw.rewrite_config(&returns("two")), Reload::Applied(2));
    assert!(gw.log().contains("trigger=\"file change\""), "{}", gw.log());
    assert_eq!(body_at(&gw, "/v"), "two");
    let next = match gw.reloads().last() {
        Some(Reload::Applied(g)) => g + 1,
        other => panic!("{other:?}"),
    };
    // In-place write (not rename) is seen too.
    std::fs::write(
        gw.dir().join("gateway.conf"),
        returns("three").replace("@PORT@", &gw.addr()),
    )
    .expect("write");
    assert!(matches!(gw.wait_generation(next), Reload::Applied(_)));
    assert_eq!(body_at(&gw, "/v"), "three");
}

#[test]
fn included_file_change_triggers_reload() {
    let gw = Gateway::start_with_files(
        "server {\n    listen @PORT@;\n    include routes.conf;\n}\n",
        &[("routes.conf", "location = /v { return 200 one; }\n")],
    );
    assert_eq!(body_at(&gw, "/v"), "one");
    gw.rewrite_file("routes.conf", "location = /v { return 200 two; }\n");
    assert_eq!(gw.wait_generation(2), Reload::Applied(2));
    assert_eq!(body_at(&gw, "/v"), "two");
}

#[test]
fn a_bad_config_is_rejected_and_the_old_one_keeps_serving() {
    let gw = Gateway::start(&returns("one"));
    let bad =
        "server {\n    listen @PORT@;\n    location /api/ { proxy_pas http://127.0.0.1:1; }\n}\n";
    assert!(matches!(gw.rewrite_config(bad), Reload::Rejected(_)));
    let log = gw.log();
    assert!(log.contains("proxy_pas"), "the log must say why:\n{log}");
    assert!(
        log.contains("gateway.conf:3"),
        "the log must point at the line:\n{log}"
    );
    assert_eq!(body_at(&gw, "/v"), "one");
    assert!(
        matches!(gw.reload(), Reload::Rejected(_)),
        "still bad on SIGHUP"
    );
    assert_eq!(body_at(&gw, "/v"), "one");
    // Unparseable text is rejected the same way.
    assert!(matches!(
        gw.rewrite_config("server { listen @PORT@; location / { return 200 x; }"),
        Reload::Rejected(_)
    ));
    assert_eq!(body_at(&gw, "/v"), "one");
    assert!(matches!(
        gw.rewrite_config(&returns("fixed")),
        Reload::Applied(_)
    ));
    assert_eq!(body_at(&gw, "/v"), "fixed");
}

#[test]
fn reload_adds_and_removes_listeners() {
    let gw = Gateway::start(&returns("one"));
    assert!(TcpStream::connect(gw.addr_n(1)).is_err());
    let two = format!(
        "{}server {{\n    listen @PORT2@;\n    location = /v {{ return 200 second; }}\n}}\n",
        returns("one")
    );
    assert!(matches!(gw.rewrite_config(&two), Reload::Applied(_)));
    let r = get(&format!("http://{}/v", gw.addr_n(1)));
    assert_eq!((r.status, r.text().as_str()), (200, "second"));
    assert!(matches!(
        gw.rewrite_config(&returns("one again")),
        Reload::Applied(_)
    ));
    assert!(
        TcpStream::connect(gw.addr_n(1)).is_err(),
        "the removed listener still accepts"
    );
    assert_eq!(body_at(&gw, "/v"), "one again");
}

#[test]
fn a_listener_that_cannot_bind_rejects_the_reload_and_leaves_nothing_behind() {
    let gw = Gateway::start(&returns("one"));
    let taken = std::net::TcpListener::bind(gw.addr_n(2)).expect("occupy @PORT3@");
    let more = format!(
        "{}server {{\n    listen @PORT2@;\n    location = /v {{ return 200 second; }}\n}}\nserver {{\n    listen @PORT3@;\n    location = /v {{ return 200 third; }}\n}}\n",
        returns("two")
    );
    assert!(matches!(gw.rewrite_config(&more), Reload::Rejected(_)));
    assert_eq!(body_at(&gw, "/v"), "one");
    assert!(
        TcpStream::connect(gw.addr_n(1)).is_err(),
        "a listener of the rejected config was left open"
    );
    drop(taken);
    assert!(matches!(gw.reload(), Reload::Applied(_)));
    assert_eq!(body_at(&gw, "/v"), "two");
    assert_eq!(get(&format!("http://{}/v", gw.addr_n(2))).text(), "third");
}

#[test]
fn reloads_under_load_drop_no_request() {
    let up = TestUpstream::start("A");
    let conf_a = format!(
        "server {{\n    listen @PORT@;\n    location / {{ proxy_pass http://{}; }}\n}}\n",
        up.addr()
    );
    let conf_b = "server {\n    listen @PORT@;\n    location / { return 200 \"B\"; }\n}\n";
    let gw = Gateway::start(&conf_a);
    let stop = Arc::new(AtomicBool::new(false));
    let url = gw.url("/load");
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let (stop, url) = (stop.clone(), url.clone());
            std::thread::spawn(move || {
                let client = if i % 2 == 0 {
                    Client::new()
                } else {
                    Client::fresh()
                };
                let (mut ok, mut bad) = (0usize, Vec::new());
                let mut seen = (false, false);
                while !stop.load(Ordering::Relaxed) {
                    match client.try_request("GET", &url, &[], "") {
                        Ok(r) if r.status == 200 && r.text() == "B" => {
                            ok += 1;
                            seen.1 = true;
                        }
                        Ok(r) if r.status == 200 && r.json()["id"] == "A" => {
                            ok += 1;
                            seen.0 = true;
                        }
                        Ok(r) => bad.push(format!("{} {}", r.status, r.text())),
                        Err(e) => bad.push(e),
                    }
                }
                (ok, bad, seen)
            })
        })
        .collect();
    for i in 0..20 {
        let conf = if i % 2 == 0 { conf_b } else { conf_a.as_str() };
        let outcome = if i % 4 < 2 {
            gw.rewrite_config(conf)
        } else {
            gw.write_config(conf);
            let r = gw.reload();
            // The file watcher may see the write too; wait for it to settle
            // on the same content either way.
            r
        };
        assert!(matches!(outcome, Reload::Applied(_)), "{outcome:?}");
        // Let each config serve some requests.
        let want = up.count() + 5;
        if conf == conf_a {
            up.wait_requests(want);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut any = (false, false);
    for w in workers {
        let (ok, bad, seen) = w.join().expect("worker");
        assert!(bad.is_empty(), "failed requests: {bad:?}");
        total += ok;
        any = (any.0 || seen.0, any.1 || seen.1);
    }
    assert!(any.0 && any.1, "both configs must have served");
    assert!(total > 40, "only {total} requests");
    let reloads = gw.reloads();
    assert!(
        reloads.iter().all(|r| matches!(r, Reload::Applied(_))),
        "{reloads:?}"
    );
    // 10 renames, and 10 renames each followed by a SIGHUP: at most 30
    // reloads. More means reloading feeds itself.
    assert!(
        reloads.len() <= 30,
        "{} reloads for 20 changes:\n{}",
        reloads.len(),
        gw.log()
    );
    println!("{} reloads", reloads.len());
}

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let up = TestUpstream::with("slow", |_| Reply::echo().delay(Duration::from_millis(500)));
    let mut gw = Gateway::start(&format!(
        "server {{\n    listen @PORT@;\n    location / {{ proxy_pass http://{}; }}\n}}\n",
        up.addr()
    ));
    let url = gw.url("/slow");
    let inflight = std::thread::spawn(move || Client::new().try_request("GET", &url, &[], ""));
    up.wait_requests(1);
    let status = gw.terminate();
    let r = inflight
        .join()
        .expect("client thread")
        .expect("the in-flight request failed");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["target"], "/slow");
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(TcpStream::connect(gw.addr()).is_err());
}

#[test]
fn sigterm_when_idle_exits_0() {
    let mut gw = Gateway::start(&returns("one"));
    assert_eq!(body_at(&gw, "/v"), "one");
    let status = gw.terminate();
    assert_eq!(status.code(), Some(0), "{}", gw.log());
}

#[test]
fn sigterm_with_a_silent_new_connection_exits_0_at_once() {
    let mut gw = Gateway::start(&returns("one"));
    assert_eq!(body_at(&gw, "/v"), "one");
    // Connected, nothing sent: not a request in flight.
    let idle = TcpStream::connect(gw.addr()).expect("connect");
    let t = std::time::Instant::now();
    let status = gw.terminate();
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for a silent connection",
        t.elapsed()
    );
    drop(idle);
}

#[test]
fn sigterm_with_an_idle_keep_alive_connection_exits_0_at_once() {
    use std::io::{Read, Write};
    let mut gw = Gateway::start(&returns("one"));
    // One request answered, the connection kept open and idle: the drain
    // must still reach it (its task has been polled many times since it
    // looked at the drain signal).
    let mut kept = TcpStream::connect(gw.addr()).expect("connect");
    kept.write_all(b"GET /v HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    kept.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"one") {
        let n = kept.read(&mut buf).expect("response");
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    let t = std::time::Instant::now();
    let status = gw.terminate();
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for an idle keep-alive connection",
        t.elapsed()
    );
    // The gateway closed it.
    assert_eq!(kept.read(&mut buf).unwrap_or(0), 0);
}

#[test]
fn shutdown_timeout_cuts_slow_requests_and_exits_1() {
    let up = TestUpstream::with("slow", |_| Reply::echo().delay(Duration::from_secs(5)));
    let mut gw = Gateway::start(&format!(
        "shutdown_timeout 300ms;\nserver {{\n    listen @PORT@;\n    location / {{ proxy_pass http://{}; }}\n}}\n",
        up.addr()
    ));
    let url = gw.url("/slow");
    let inflight = std::thread::spawn(move || Client::new().try_request("GET", &url, &[], ""));
    up.wait_requests(1);
    let status = gw.terminate();
    assert_eq!(status.code(), Some(1), "{}", gw.log());
    assert!(
        inflight.join().expect("client thread").is_err(),
        "the cut request cannot have completed"
    );
}

#[test]
fn a_reload_gives_new_connections_the_new_client_limits() {
    use std::io::{Read, Write};
    let conf = |keepalive: &str| {
        format!(
            "server {{\n    listen @PORT@;\n    keepalive_timeout {keepalive};\n    location = /v {{ return 200 v; }}\n}}\n"
        )
    };
    let gw = Gateway::start(&conf("60s"));
    assert_eq!(gw.rewrite_config(&conf("1s")), Reload::Applied(2));
    // A connection made after the reload is closed after 1 s idle, not 60.
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(b"GET /v HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nv") {
        let n = s.read(&mut buf).expect("response");
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    let idle_since = std::time::Instant::now();
    let closed = matches!(s.read(&mut buf), Ok(0));
    assert!(closed, "the idle connection was not closed within 20 s");
    assert!(
        idle_since.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        idle_since.elapsed()
    );
}

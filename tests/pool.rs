//! Upstream connection pooling (src/proxy/pool.rs) through the real binary:
//! reuse, the `keepalive N` bound on idle connections, and a connection
//! whose response body was cut short is never reused. The upstream here
//! counts the connections it accepts and those still open.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use util::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// An upstream that counts connections. `/slow` answers after 300 ms;
/// `/big` answers 4 MiB.
struct CountingUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

impl CountingUpstream {
    fn start() -> CountingUpstream {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (acc, op) = (accepted.clone(), open.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            let big = Bytes::from(vec![b'x'; 4 << 20]);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                op.fetch_add(1, Ordering::SeqCst);
                let (op, big) = (op.clone(), big.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let big = big.clone();
                        async move {
                            let body = match req.uri().path() {
                                "/slow" => {
                                    tokio::time::sleep(Duration::from_millis(300)).await;
                                    Bytes::from_static(b"slow")
                                }
                                "/big" => big,
                                _ => Bytes::from_static(b"ok"),
                            };
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(body)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    op.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        CountingUpstream {
            addr,
            accepted,
            open,
            _rt: rt,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Wait (bounded) until `pred(open connections)` holds.
    fn wait_open(&self, what: &str, pred: impl Fn(usize) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !pred(self.open()) {
            assert!(
                Instant::now() < end,
                "{what}: {} connections still open",
                self.open()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn gateway(up: &CountingUpstream, keepalive: usize) -> Gateway {
    Gateway::start(&format!(
        "worker_threads 1;\n\
         upstream up {{ server {}; keepalive {keepalive}; }}\n\
         server {{\n    listen @PORT@;\n    location / {{ proxy_pass http://up; }}\n}}\n",
        up.addr
    ))
}

#[test]
fn sequential_requests_reuse_one_upstream_connection() {
    let up = CountingUpstream::start();
    let gw = gateway(&up, 8);
    let client = Client::new();
    for i in 0..20 {
        let r = client.get(&gw.url("/x"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), "ok");
    }
    // Also from new client connections: the upstream side is pooled.
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/y")).status, 200);
    }
    assert_eq!(up.accepted(), 1, "25 requests, one upstream connection");
}

#[test]
fn idle_upstream_connections_are_bounded_by_keepalive() {
    let up = CountingUpstream::start();
    let gw = gateway(&up, 2);
    // 8 requests in flight at once need 8 upstream connections.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let url = gw.url("/slow");
            std::thread::spawn(move || get(&url))
        })
        .collect();
    for h in handles {
        let r = h.join().expect("client thread");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        up.accepted(),
        8,
        "one upstream connection per request in flight"
    );
    // Afterwards only `keepalive 2` stay open; the rest were closed.
    up.wait_open("idle connections beyond keepalive", |n| n <= 2);
    assert!(up.open() >= 1, "a kept connection stays open");
    // And the kept ones are used again.
    let before = up.accepted();
    assert_eq!(get(&gw.url("/x")).status, 200);
    assert_eq!(up.accepted(), before, "a kept connection served it");
}

#[test]
fn a_response_cut_short_never_returns_its_connection() {
    let up = CountingUpstream::start();
    let gw = gateway(&up, 8);
    assert_eq!(get(&gw.url("/x")).status, 200);
    assert_eq!(up.accepted(), 1);
    // A client reads the head of a 4 MiB response and hangs up.
    {
        let mut s = TcpStream::connect(gw.addr()).expect("connect");
        s.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("write");
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).expect("read");
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "the response started"
        );
    }
    // The half-read upstream connection (the only one) is closed, not
    // pooled...
    up.wait_open("the cut connection", |n| n == 0);
    // ...and the next requests are served cleanly, on a new one.
    for _ in 0..3 {
        let r = get(&gw.url("/x"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(up.accepted(), 2, "one new connection after the cut");
    let big = get(&gw.url("/big"));
    assert_eq!(big.status, 200);
    assert_eq!(big.body.len(), 4 << 20, "a whole body after the cut one");
}

/// An upstream whose keep-alive ends as the next request arrives: it
/// answers the first request of each connection (keep-alive, no
/// `Connection: close`), then closes the connection when the second one
/// comes in, without a response — the race with an upstream's keep-alive
/// timeout, made deterministic. Counts the requests it answered by method.
struct OneShotUpstream {
    addr: std::net::SocketAddr,
    answered: Arc<std::sync::Mutex<Vec<String>>>,
}

impl OneShotUpstream {
    fn start() -> OneShotUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let answered: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let log = answered.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let log = log.clone();
                std::thread::spawn(move || {
                    let Some(head) = read_head(&mut stream) else {
                        return;
                    };
                    let method = head.split(' ').next().unwrap_or("").to_string();
                    // A body announced by Content-Length is read too.
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    if stream.read_exact(&mut body).is_err() {
                        return;
                    }
                    log.lock().expect("log").push(method);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    // The next request on this connection: hang up on it.
                    let _ = read_head(&mut stream);
                });
            }
        });
        OneShotUpstream { addr, answered }
    }

    fn answered(&self) -> Vec<String> {
        self.answered.lock().expect("log").clone()
    }
}

/// Read one request head (up to the blank line); `None` at EOF.
fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

#[test]
fn a_pooled_connection_closed_under_a_get_is_retried_fresh() {
    let up = OneShotUpstream::start();
    let gw = Gateway::start(&format!(
        "worker_threads 1;\n\
         upstream up {{ server {}; keepalive 8; }}\n\
         server {{\n    listen @PORT@;\n    location / {{ proxy_pass http://up; }}\n}}\n",
        up.addr
    ));
    let client = Client::new();
    // Every GET after the first meets a pooled connection that the
    // upstream closes under it: each is sent again on a new connection.
    for i in 0..10 {
        let r = client.get(&gw.url("/x"));
        assert_eq!(r.status, 200, "GET {i}: {}", r.text());
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(up.answered().len(), 10);
    // A POST with a body is never sent twice: the stale connection is a
    // 502 for it (the upstream answered no POST).
    let r = client.request("POST", &gw.url("/x"), &[], "payload");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        !up.answered().iter().any(|m| m == "POST"),
        "{:?}",
        up.answered()
    );
}

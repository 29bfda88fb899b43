//! The upstream HTTP/1 client (src/proxy/client.rs) through the real
//! binary, against a scripted upstream that writes its responses byte for
//! byte: chunked bodies with extensions and trailers, bodiless responses
//! (HEAD, 204) that must not be waited on, interim 1xx responses, HTTP/1.0
//! bodies that run to the close, request bodies framed on the way up, and
//! an idle pooled connection the upstream closes (the next request, a POST
//! with a body, must not pay for it).

mod util;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use util::*;

const DEADLINE: Duration = Duration::from_secs(10);

/// One request as the upstream read it.
#[derive(Debug, Clone)]
struct Seen {
    conn: usize,
    method: String,
    path: String,
    head: String,
    body: Vec<u8>,
}

#[derive(Default)]
struct Log {
    seen: Vec<Seen>,
    accepted: usize,
    closed: usize,
}

/// The scripted upstream. Paths:
/// - `/chunked`: a chunked body with a chunk extension and a trailer;
/// - `/big-chunked`: 1 MiB in chunks of 10,000 bytes;
/// - `/head-len`: `Content-Length: 5` and, for HEAD, no body;
/// - `/no-content`: 204;
/// - `/early`: a 103 with a `Link`, then the 200;
/// - `/http10`: an HTTP/1.0 response without a length, then the close;
/// - `/close-after`: a keep-alive 200, then the upstream closes the
///   connection anyway (as an idle timeout would);
/// - `/reject-early`: a 413 right after the head, the body never read;
/// - `/black-hole`: reads the head, then neither the body nor answers;
/// - `/trickle`: a 5-byte body, one byte every 400 ms;
/// - `/stall`: the head and half the body, then silence for 5 s;
/// - anything else: 200 echoing the request body.
struct Scripted {
    addr: SocketAddr,
    log: Arc<(Mutex<Log>, Condvar)>,
}

impl Scripted {
    fn start() -> Scripted {
        // A small receive buffer (inherited by accepted sockets): a body
        // the upstream does not read backs up quickly.
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
            .expect("bind");
        sock.listen(64).expect("listen");
        let listener: TcpListener = sock.into();
        let addr = listener.local_addr().expect("addr");
        let log: Arc<(Mutex<Log>, Condvar)> = Arc::default();
        let l = log.clone();
        std::thread::spawn(move || {
            for (id, s) in listener.incoming().enumerate() {
                let Ok(s) = s else { continue };
                l.0.lock().expect("log").accepted += 1;
                let l = l.clone();
                std::thread::spawn(move || {
                    serve(id, s, &l);
                    l.0.lock().expect("log").closed += 1;
                    l.1.notify_all();
                });
            }
        });
        Scripted { addr, log }
    }

    fn accepted(&self) -> usize {
        self.log.0.lock().expect("log").accepted
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.0.lock().expect("log").seen.clone()
    }

    /// Wait (bounded) until `pred` holds.
    fn wait(&self, what: &str, pred: impl Fn(&Log) -> bool) {
        let (m, cv) = &*self.log;
        let end = Instant::now() + DEADLINE;
        let mut g = m.lock().expect("log");
        while !pred(&g) {
            let now = Instant::now();
            assert!(now < end, "timed out waiting for {what}");
            g = cv.wait_timeout(g, end - now).expect("log").0;
        }
    }
}

fn serve(id: usize, s: TcpStream, log: &(Mutex<Log>, Condvar)) {
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let mut first = head.split(' ');
        let method = first.next().unwrap_or("").to_string();
        let path = first.next().unwrap_or("").to_string();
        let lower = head.to_ascii_lowercase();
        if path == "/black-hole" {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        if path == "/reject-early" {
            // Refuse at the head, then neither read the body nor close
            // (until the test is long over).
            let _ = w.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nnope");
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        let mut body = Vec::new();
        if let Some(n) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            body.resize(n, 0);
            if r.read_exact(&mut body).is_err() {
                return;
            }
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                let mut size = String::new();
                if r.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; n + 2];
                if r.read_exact(&mut chunk).is_err() {
                    return;
                }
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        {
            let mut g = log.0.lock().expect("log");
            g.seen.push(Seen {
                conn: id,
                method: method.clone(),
                path: path.clone(),
                head: head.clone(),
                body: body.clone(),
            });
            log.1.notify_all();
        }
        let reply: Vec<u8> = match path.as_str() {
            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec(),
            "/big-chunked" => {
                let mut v = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                let chunk = vec![b'x'; 10_000];
                let mut left = 1 << 20;
                while left > 0 {
                    let n = left.min(chunk.len());
                    v.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                    v.extend_from_slice(&chunk[..n]);
                    v.extend_from_slice(b"\r\n");
                    left -= n;
                }
                v.extend_from_slice(b"0\r\n\r\n");
                v
            }
            "/head-len" if method == "HEAD" => {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec()
            }
            "/no-content" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            "/http10" => {
                let _ = w.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold style");
                return;
            }
            "/close-after" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                return;
            }
            "/trickle" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
                for b in b"abcde" {
                    std::thread::sleep(Duration::from_millis(400));
                    if w.write_all(&[*b]).is_err() {
                        return;
                    }
                }
                continue;
            }
            "/stall" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!");
                std::thread::sleep(Duration::from_secs(5));
                return;
            }
            _ => {
                let mut v = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                    .into_bytes();
                v.extend_from_slice(&body);
                v
            }
        };
        if w.write_all(&reply).is_err() {
            return;
        }
    }
}

fn gateway(up: &Scripted) -> Gateway {
    Gateway::start(&format!(
        "worker_threads 1;\n\
         upstream up {{ server {}; keepalive 8; }}\n\
         server {{\n    listen @PORT@;\n    proxy_read_timeout 3s;\n    location / {{ proxy_pass http://up; }}\n}}\n",
        up.addr
    ))
}

#[test]
fn chunked_bodies_are_decoded_and_the_connection_reused() {
    let up = Scripted::start();
    let gw = gateway(&up);
    let client = Client::new();
    for _ in 0..3 {
        let r = client.get(&gw.url("/chunked"));
        assert_eq!((r.status, r.text().as_str()), (200, "hello world"));
    }
    let r = client.get(&gw.url("/big-chunked"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 1 << 20);
    assert!(r.body.iter().all(|&b| b == b'x'));
    assert_eq!(up.accepted(), 1, "one upstream connection for all four");
}

#[test]
fn bodiless_responses_are_not_waited_on() {
    let up = Scripted::start();
    let gw = gateway(&up);
    let client = Client::new();
    let t = Instant::now();
    let r = client.request("HEAD", &gw.url("/head-len"), &[], "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length").as_deref(), Some("5"));
    assert!(r.body.is_empty());
    let r = client.get(&gw.url("/no-content"));
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = client.request("POST", &gw.url("/echo"), &[], "after");
    assert_eq!((r.status, r.text().as_str()), (200, "after"));
    // Waiting for a body that never comes would have taken the 3 s
    // proxy_read_timeout (and a 504, or a hang).
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(up.accepted(), 1);
}

#[test]
fn interim_responses_are_skipped() {
    let up = Scripted::start();
    let gw = gateway(&up);
    let r = get(&gw.url("/early"));
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(r.header("link"), None, "the 103's headers stay with it");
}

#[test]
fn http10_bodies_run_to_the_close_and_are_not_reused() {
    let up = Scripted::start();
    let gw = gateway(&up);
    let client = Client::new();
    let r = client.get(&gw.url("/http10"));
    assert_eq!((r.status, r.text().as_str()), (200, "old style"));
    let r = client.get(&gw.url("/echo"));
    assert_eq!(r.status, 200);
    assert_eq!(up.accepted(), 2);
}

#[test]
fn an_upstream_closing_an_idle_connection_costs_no_request() {
    let up = Scripted::start();
    let gw = gateway(&up);
    let client = Client::new();
    for i in 1..=3 {
        let r = client.get(&gw.url("/close-after"));
        assert_eq!((r.status, r.text().as_str()), (200, "ok"));
        up.wait("the upstream to close", |l| l.closed >= i);
        // Not idempotent and with a body: a stale connection would be a 502.
        let r = client.request("POST", &gw.url("/echo"), &[], format!("payload {i}"));
        assert_eq!(
            (r.status, r.text()),
            (200, format!("payload {i}")),
            "round {i}"
        );
    }
    let seen = up.seen();
    let posts: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == "POST" && s.path == "/echo")
        .collect();
    assert_eq!(posts.len(), 3, "each POST went up once: {seen:?}");
    // Each on a new connection: the closed one was noticed at checkout.
    let conns: std::collections::HashSet<usize> = posts.iter().map(|s| s.conn).collect();
    assert_eq!(conns.len(), 3, "{seen:?}");
}

#[test]
fn request_bodies_go_up_framed() {
    let up = Scripted::start();
    let gw = gateway(&up);
    // Content-Length from the client, small and large (under the default
    // client_max_body_size of 1m).
    let big = vec![b'y'; 900_000];
    for body in [b"hello".to_vec(), big.clone()] {
        let r = request("PUT", &gw.url("/echo"), &[], body.clone());
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), body.len());
        let last = up.seen().pop().expect("seen");
        assert!(
            last.head
                .to_ascii_lowercase()
                .contains(&format!("content-length: {}\r\n", body.len())),
            "{}",
            last.head
        );
        assert_eq!(last.body, body);
    }
    // Chunked from the client: chunked upstream, the same bytes.
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nabcd\r\n")
        .expect("write");
    s.write_all(b"3\r\nefg\r\n0\r\n\r\n").expect("write");
    let mut out = Vec::new();
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("abcdefg"), "{text}");
    let last = up.seen().pop().expect("seen");
    assert!(
        last.head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked\r\n"),
        "{}",
        last.head
    );
    assert_eq!(last.body, b"abcdefg");
}

#[test]
fn an_upstream_answering_before_reading_the_body_is_heard() {
    let up = Scripted::start();
    let gw = gateway_with(&up, "proxy_read_timeout 3s;");
    // 16 MiB: far more than the kernel buffers between the gateway and
    // the upstream hold, so the gateway's writes stall.
    let (got, _, s, sender) = upload_16_mib(&gw, "/reject-early");
    let text = String::from_utf8_lossy(&got);
    // Not a 504 after proxy_read_timeout with the gateway stuck writing.
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    drop(s);
    let _ = sender.join();
}

#[test]
fn proxy_read_timeout_runs_between_two_reads_of_a_body() {
    let up = Scripted::start();
    let gw = gateway_with(&up, "proxy_read_timeout 1s;");
    // Two seconds in all, but never a second without a byte: served whole.
    let t = Instant::now();
    let r = Client::new().request("GET", &gw.url("/trickle"), &[], "");
    assert_eq!((r.status, r.text().as_str()), (200, "abcde"));
    assert!(
        t.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        t.elapsed()
    );
    // Half a body, then silence: the client's connection is cut about a
    // second after the last byte, not when the upstream gives up (5 s).
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    s.write_all(b"GET /stall HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no close after {:?}: {e}", t.elapsed()),
        }
    }
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("half!"), "{text}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(3500),
        "cut after {took:?}"
    );
}

fn gateway_with(up: &Scripted, timeouts: &str) -> Gateway {
    Gateway::start(&format!(
        "worker_threads 1;\n\
         upstream up {{ server {}; keepalive 8; }}\n\
         server {{\n    listen @PORT@;\n    {timeouts}\n    client_max_body_size 64m;\n    location / {{ proxy_pass http://up; }}\n}}\n",
        up.addr
    ))
}

#[test]
fn a_slow_client_body_is_not_the_upstreams_time() {
    // proxy_read_timeout runs once the request is out: a client taking
    // two seconds to send its body is not cut after one.
    let up = Scripted::start();
    let gw = gateway_with(&up, "proxy_read_timeout 1s; proxy_send_timeout 1s;");
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
        .expect("write");
    for b in b"abcde" {
        std::thread::sleep(Duration::from_millis(400));
        s.write_all(&[*b]).expect("write");
    }
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).expect("status line");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut rest = String::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("head");
        if line == "\r\n" {
            break;
        }
        rest.push_str(&line);
    }
    let mut body = [0u8; 5];
    r.read_exact(&mut body).expect("body");
    assert_eq!(&body, b"abcde", "{rest}");
}

#[test]
fn proxy_send_timeout_bounds_a_write_the_upstream_does_not_take() {
    let up = Scripted::start();
    let gw = gateway_with(&up, "proxy_read_timeout 30s; proxy_send_timeout 1s;");
    // 16 MiB against an upstream that reads none of it: the gateway's
    // writes stall once the kernel buffers are full.
    let (got, took, s, sender) = upload_16_mib(&gw, "/black-hole");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 504"), "after {took:?}: {text}");
    assert!(
        took < Duration::from_secs(8),
        "504 after {took:?}, not proxy_send_timeout"
    );
    drop(s);
    let _ = sender.join();
}

/// POST 16 MiB to `path` from a thread and read the response head as it
/// comes: the head's bytes, the time it took, the connection and the
/// sending thread.
fn upload_16_mib(
    gw: &Gateway,
    path: &str,
) -> (Vec<u8>, Duration, TcpStream, std::thread::JoinHandle<()>) {
    let len = 16 << 20;
    let mut s = TcpStream::connect(gw.addr()).expect("connect");
    let mut writer = s.try_clone().expect("clone");
    let head = format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n");
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
        let chunk = vec![b'z'; 64 * 1024];
        for _ in 0..len / chunk.len() {
            if writer.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    (got, t.elapsed(), s, sender)
}
